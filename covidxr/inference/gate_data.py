"""Which images the input gate is fitted on: the run's training and validation split, real images of other kinds
(lateral films, CT slices) split by patient (:func:`patient_halves`), and made photographs and documents
(:mod:`covidxr.inference.gate_kinds`). Used by :mod:`covidxr.inference.gate_fit`."""

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
from covidxr.inference.gate_kinds import KINDS, write_made_images

log = logging.getLogger("covidxr.gate")


@dataclass
class GateImages:
    """Letterboxed uint8 ``(S', S')`` squares (at :func:`covidxr.preprocessing.transforms.cache_size`) the gate is
    fitted on.

    Attributes:
        train: the training split's films.
        val: the validation split's films.
        fit: other kind (``lateral``, ``ct``, ``photo``, ``document``) -> images the view check learns.
        holdout: other kind -> images of the patients it did not learn (measured only).
        info: where they came from, stored in the gate's info.
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    fit: dict[str, list[np.ndarray]] = field(default_factory=dict)
    holdout: dict[str, list[np.ndarray]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def default_kind_folder(data_path: Path, kind: str = "lateral") -> Path | None:
    """``notcxr/KIND`` beside the data (or one folder up), or None."""
    root = data_path if data_path.is_dir() else data_path.parent
    for candidate in (root / "notcxr" / kind, root.parent / "notcxr" / kind):
        if candidate.is_dir():
            return candidate
    return None


def patient_halves(folder: Path, seed: int) -> pd.DataFrame:
    """The images of ``folder`` with their patient and role: ``fit`` (a seeded half of the patients) or
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


def gate_images(run: RunData, settings: LoaderSettings, folders: dict[str, Path | None], seed: int,
                made: int = 0) -> GateImages:
    """The run's training and validation films, the real images of other kinds (:func:`patient_halves`) and
    ``made`` photographs and documents each, prepared.

    Args:
        run: the run's data with its split (``covidxr.data.loaders.load_run_data``).
        settings: the run's loader settings (image size, cache).
        folders: kind (``lateral``, ``ct``) -> its folder (None: the view check does not learn that kind).
        seed: picks the patients fitted on, and the made images.
        made: how many photographs and how many documents to make (0: none).
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
                            info={"data": str(settings.data), "fit_sha256": []})
        for kind, folder in folders.items():
            if folder is None:
                log.warning("gate: no %s images found (pass --%s FOLDER): the view check does not learn them", kind,
                            kind)
                continue
            if not folder.is_dir():
                raise DatasetError(f"{kind}: {folder} is not a folder")
            table = patient_halves(folder, seed)
            for role in ("fit", "holdout"):
                rows, squares, _ = prepare_rows(table[table["role"] == role], settings)
                getattr(images, role)[kind] = squares
                images.info[f"{kind}_{role}"] = rows["relpath"].tolist()
                if role == "fit":  # lets a later refusal count tell fitted images from held-out ones
                    images.info["fit_sha256"] += [file_digest(p) for p in rows["path"]]
            images.info[f"{kind}_folder"] = folder.name
        for kind in KINDS if made else ():
            paths = write_made_images(Path(tmp) / kind, kind, made, seed)
            table = pd.DataFrame({"path": list(map(str, paths)), "relpath": [p.name for p in paths]})
            own_cache = replace(settings, cache=True, cache_dir=str(Path(tmp) / "made-cache"))  # not the run's cache
            images.fit[kind] = prepare_rows(table, own_cache, progress=False)[1]
    return images


