"""Which films the input gate is fitted on: the run's training and validation split, and lateral films split by
patient (:func:`lateral_table`). Used by :mod:`covidxr.inference.gate_fit`."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from covidxr.data.loaders import LoaderSettings, RunData, prepare_rows
from covidxr.errors import DatasetError
from covidxr.files import file_digest

log = logging.getLogger("covidxr.gate")


@dataclass
class GateImages:
    """Letterboxed uint8 ``(S', S')`` squares (at :func:`covidxr.preprocess.cache_size`) the gate is fitted on."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    lateral_fit: list[np.ndarray] = field(default_factory=list)
    lateral_holdout: list[np.ndarray] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # where they came from, stored in the gate's info



def default_laterals(data_path: Path) -> Path | None:
    """``notcxr/lateral`` beside the data (or one folder up), or None."""
    root = data_path if data_path.is_dir() else data_path.parent
    for candidate in (root / "notcxr" / "lateral", root.parent / "notcxr" / "lateral"):
        if candidate.is_dir():
            return candidate
    return None


def lateral_table(folder: Path, seed: int) -> pd.DataFrame:
    """The lateral films of ``folder`` with their patient and role: ``fit`` (a seeded half of the patients) or
    ``holdout``.

    Patients come from a ``metadata.csv`` (``path``, ``patient_id``) in the folder or its parent; a file without a row
    is its own patient.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() not in (".csv", ".md", ".txt"))
    patients = {}
    for meta in (folder / "metadata.csv", folder.parent / "metadata.csv"):
        if meta.is_file():
            table = pd.read_csv(meta, dtype=str, keep_default_na=False)
            if {"path", "patient_id"} <= set(table.columns):
                patients |= {os.path.realpath(meta.parent / p): pid for p, pid in
                             zip(table["path"], table["patient_id"], strict=True)}
    table = pd.DataFrame({"path": [str(f) for f in files], "relpath": [f.name for f in files],
                          "patient_id": [patients.get(os.path.realpath(f), f"file:{f.name}") for f in files]})
    order = np.random.default_rng(seed).permutation(sorted(table["patient_id"].unique()))
    fit = set(order[: len(order) // 2])
    return table.assign(role=np.where(table["patient_id"].isin(fit), "fit", "holdout"))


def gate_images(run: RunData, settings: LoaderSettings, laterals: Path | None, seed: int) -> GateImages:
    """The run's training and validation films and the lateral films (:func:`lateral_table`), prepared.

    Args:
        run: the run's data with its split (``covidxr.data.loaders.load_run_data``).
        settings: the run's loader settings (image size, cache).
        laterals: folder of lateral films (None: no lateral class).
        seed: picks the lateral patients fitted on.
    """
    with tempfile.TemporaryDirectory(prefix="covidxr-gate-") as tmp:
        if not settings.cache:  # a run without the cache gets no files in it from the gate either
            settings = replace(settings, cache=True, cache_dir=tmp)
        if run.images is None:
            _, squares, _ = prepare_rows(run.table, settings)
        else:
            squares = run.images
        split = run.table["split"].to_numpy()
        images = GateImages([s for s, part in zip(squares, split, strict=True) if part == "train"],
                            [s for s, part in zip(squares, split, strict=True) if part == "val"],
                            info={"data": str(settings.data)})
        if laterals is None:
            log.warning("gate: no lateral films found (pass --laterals FOLDER): the view check learns rotated and "
                        "inverted films only")
            return images
        if not laterals.is_dir():
            raise DatasetError(f"laterals: {laterals} is not a folder")
        table = lateral_table(laterals, seed)
        for role in ("fit", "holdout"):
            rows, squares, _ = prepare_rows(table[table["role"] == role], settings)
            setattr(images, f"lateral_{role}", squares)
            images.info[f"lateral_{role}"] = rows["relpath"].tolist()
            if role == "fit":  # lets a later refusal count tell fitted laterals from held-out ones
                images.info["lateral_fit_sha256"] = [file_digest(p) for p in rows["path"]]
    images.info["lateral_folder"] = str(laterals)
    return images


