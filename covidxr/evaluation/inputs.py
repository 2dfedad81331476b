"""What an evaluation reads: its options, the checkpoint, and the rows to predict.

The run's own data (default: the data it was trained on, split as recorded in ``split.csv`` beside the checkpoint
or in the checkpoint) is evaluated on its ``test`` split by default; its validation split is loaded as well, for
calibration. A dataset whose images are not the run's split is *external*: all its images are evaluated (``--split
all``), its labels are mapped onto the checkpoint's classes and images that were also in the run's data (same path
or same bytes) are flagged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from covidxr.data.loaders import LoaderSettings, RunData, input_pipeline, load_run_data, prepare_rows
from covidxr.data.manifest import MANIFEST_NAMES, dataset_root, load_manifest
from covidxr.data.run_folder import RunFolder
from covidxr.errors import DatasetError
from covidxr.files import file_digest, text_digest
from covidxr.model.trained import TrainedModel

EXTERNAL = "external"


@dataclass
class EvalOptions:
    """Settings of one evaluation (the command-line arguments)."""

    checkpoint: Path
    data: str | None = None
    split: str | None = None  # test | val | all; None: test for the run's data, all for an external dataset
    out: Path | None = None
    batch_size: int = 32
    device: str = "auto"
    positive: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    workers: int = 0
    command: list[str] = field(default_factory=list)
    progress: bool = True
    external: list[Path] = field(default_factory=list)  # external folders evaluated beside the run's split
    crossval: Path | None = None  # crossval.json to report (default: crossval/crossval.json beside the checkpoint)
    gate_check: list[Path] = field(default_factory=list)  # unlabelled folders whose refusal rate is reported
    gate_variants: bool = False  # also report the refusal rate of rotated and inverted copies of the evaluated images
    lung_share_limit: int = 200  # Grad-CAM lung share over at most this many images per split (0: skip)
    gallery: int = 4  # most confident errors shown per true class and evaluated set (0: no failure gallery)
    prevalence: float | None = None  # prevalence the decision curves assume (None: each set's own)
    pdf: bool = False  # also print report.html to report.pdf with headless Chromium
    tta: bool = False  # average the probabilities over the views of covidxr.networks.tta (measurement only: no sidecar)
    site: Path | None = None  # a site profile (python -m covidxr.adapt): evaluate the model adapted to that site


@dataclass
class EvalData:
    """The rows to predict, prepared for the run's loaders."""

    run: RunData  # its ``split`` column holds the loader role (val, test or skip)
    run_split: pd.Series  # the run's split of each row (train/val/test), or "external"
    own: bool
    data_path: Path
    split: str
    warnings: list[str]
    manifest: dict[str, str]  # manifest_file, manifest_sha256
    settings: LoaderSettings  # the run's, with this evaluation's data, image size, batch size and workers


def manifest_record(data_path: Path, table: pd.DataFrame) -> dict[str, str]:
    """Return ``{"manifest_file", "manifest_sha256"}``: the SHA-256 of the manifest file ``data_path`` (or the one
    in that folder), else of the listing of the scanned folder ``table``."""
    candidates = [data_path] if data_path.is_file() else [data_path / n for n in MANIFEST_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return {"manifest_file": str(candidate), "manifest_sha256": file_digest(candidate)}
    listing = "".join(f"{r},{lab}\n" for r, lab in sorted(zip(table["relpath"], table["label"], strict=True)))
    return {"manifest_file": "(folder listing: relpath,label per image)", "manifest_sha256": text_digest(listing)}


def is_run_data(table: pd.DataFrame, split: pd.DataFrame | None) -> bool:
    """Whether ``table`` holds every image of the run's split (matched on ``relpath``): the run's own data."""
    return split is not None and set(split["relpath"]) <= set(table["relpath"])


def eval_settings(run: RunFolder, opts: EvalOptions, data_path: Path) -> LoaderSettings:
    """The run's data and loader settings with this evaluation's data, batch size and workers; the image size, lung
    crop, lung mask and equalisation come from the checkpoint's preprocessing record, the lung model from the
    checkpoint."""
    return run.loader_settings(data_path, batch_size=opts.batch_size, workers=opts.workers)


def loader_roles(run_split: pd.Series, split: str, own: bool) -> pd.Series:
    """Map each row to the loader that predicts it: ``val`` (calibration), ``test`` (evaluated) or ``skip``.

    Args:
        run_split: The run's split per row (``train``/``val``/``test``); ignored for an external dataset.
        split: The evaluated split (``test``, ``val`` or ``all``).
        own: Whether the rows are the run's own data (an external dataset is evaluated whole).

    Returns:
        A Series of roles aligned with ``run_split``.
    """
    if not own:
        return pd.Series("test", index=run_split.index, dtype=object)
    roles = pd.Series(np.where(run_split == "val", "val", "skip"), index=run_split.index, dtype=object)
    if split == "all":
        roles[run_split != "val"] = "test"
    elif split == "test":
        roles[run_split == "test"] = "test"
    return roles


def load_own_data(classes: Sequence[str], settings: LoaderSettings, split_table: pd.DataFrame, split: str) -> RunData:
    """Load the run's data as training did, with its recorded split (the ``table`` carries the run's split).

    Raises:
        DatasetError: The classes changed since training, or the evaluated ``split`` has no readable image.
    """
    data = load_run_data(settings, split_table)
    if data.classes != list(classes):
        raise DatasetError(f"the run's data now has classes {data.classes}, the checkpoint {list(classes)}")
    if split in ("val", "test") and not (data.table["split"] == split).any():
        other = "val" if split == "test" else "test"
        raise DatasetError(f"the run's {split} split is empty or unreadable; choose --split {other} or all")
    return data


def match_labels(table: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Map an external dataset's labels onto the checkpoint's classes (case-insensitive).

    Args:
        table: The external manifest.
        classes: The checkpoint's classes.

    Returns:
        ``(table with mapped labels, warnings)``.

    Raises:
        DatasetError: A label matches no class.
    """
    lookup = {c.lower(): c for c in classes}
    mapped = table["label"].map(lambda s: lookup.get(str(s).strip().lower()))
    unknown = sorted(set(table.loc[mapped.isna(), "label"]))
    if unknown:
        raise DatasetError(f"label(s) {', '.join(map(repr, unknown))} are not classes of the model "
                           f"({', '.join(classes)}); relabel them in a manifest CSV (path,label,...)")
    renamed = sorted({f"{a!r} -> {b!r}" for a, b in zip(table["label"], mapped, strict=True) if a != b})
    warnings = [f"labels mapped onto the model's classes: {', '.join(renamed)}"] if renamed else []
    missing = [c for c in classes if c not in set(mapped)]
    if missing:
        warnings.append(f"class(es) {', '.join(missing)} absent from this dataset: their sensitivity and ROC-AUC "
                        "are undefined and the macro averages leave them out")
    return table.assign(label=mapped), warnings


def _training_paths(root: str | os.PathLike | None, split: pd.DataFrame | None) -> pd.DataFrame:
    """Absolute paths and splits of the run's images (relpaths resolved against the training root)."""
    if split is None:
        return pd.DataFrame(columns=["path", "split"])
    root = Path(root or ".")
    paths = [str(Path(r) if Path(r).is_absolute() else root / r) for r in split["relpath"]]
    return pd.DataFrame({"path": paths, "split": split["split"].tolist()})


def training_overlap(root: str | os.PathLike | None, split: pd.DataFrame | None, table: pd.DataFrame) -> pd.Series:
    """The run split of each external image that was also in the run's data (same path or same bytes).

    Args:
        root: The run's data root (the checkpoint's ``data.root``: resolves the run's relative paths).
        split: The run's recorded split.
        table: The external dataset (column ``path``).

    Returns:
        Series aligned with ``table``: ``train``/``val``/``test`` for images seen in the run, ``""`` otherwise.
    """
    runs = _training_paths(root, split)
    by_path = {os.path.realpath(p): s for p, s in zip(runs["path"], runs["split"], strict=True)}
    by_digest = {}
    for p, s in zip(runs["path"], runs["split"], strict=True):
        if os.path.isfile(p):
            by_digest.setdefault(file_digest(p), s)
    out = []
    for p in table["path"]:
        hit = by_path.get(os.path.realpath(p))
        if hit is None and by_digest and os.path.isfile(p):
            hit = by_digest.get(file_digest(p))
        out.append(hit or "")
    return pd.Series(out, index=table.index, dtype=object)


def load_external_data(classes: Sequence[str], settings: LoaderSettings, table: pd.DataFrame, split: str,
                       prepare: bool = True) -> RunData:
    """Prepare the selected rows of an external dataset for the run's loaders (their split column: "external").

    With ``prepare`` False the rows are kept as listed, unread: the evaluation's film pass reads each film once and
    gives its logits (:func:`without_unreadable` then drops the films it could not read).

    Args:
        classes: The model's classes.
        settings: The evaluation's loader settings (:func:`eval_settings`).
        table: The external manifest with labels mapped onto the checkpoint's classes.
        split: ``all``, or a value of the manifest's own ``split`` column (only those rows are kept).
    """
    if split != "all":
        if "split" not in table.columns or not (table["split"] == split).any():
            raise DatasetError(f"--split {split}: an external dataset has no run split; its manifest has no "
                               f"{split!r} rows in a split column (use --split all)")
        table = table[table["split"] == split]
    table = table.assign(split=EXTERNAL).reset_index(drop=True)
    pipeline = input_pipeline(settings)
    if not prepare:
        return RunData(table, list(classes), dataset_root(Path(settings.data)), None, {}, pipeline)
    table, images, unreadable = prepare_rows(table, settings, pipeline=pipeline)
    return RunData(table, list(classes), dataset_root(Path(settings.data)), images, unreadable, pipeline)


def without_unreadable(data: EvalData, unreadable: Mapping[str, str]) -> EvalData:
    """``data`` without the rows whose film (by ``path``) could not be read, each listed in ``run.unreadable`` with
    its reason, as preparing them would have listed it."""
    table = data.run.table
    bad = table["path"].astype(str).isin(set(unreadable)).to_numpy()
    if not bad.any():
        return data
    listed = {str(r): unreadable[str(p)] for r, p in zip(table.loc[bad, "relpath"], table.loc[bad, "path"],
                                                            strict=True)}
    images = None if data.run.images is None else [im for im, b in zip(data.run.images, bad, strict=True) if not b]
    run = replace(data.run, table=table[~bad].reset_index(drop=True), images=images,
                  unreadable={**data.run.unreadable, **listed})
    return replace(data, run=run, run_split=data.run_split[~bad].reset_index(drop=True))


def load_eval_data(model: TrainedModel, opts: EvalOptions, prepare: bool = True) -> EvalData:
    """Resolve the dataset, decide whether it is the run's own data, and prepare the rows to predict.

    Args:
        model: The trained model (``split.csv`` is looked for beside its checkpoint).
        opts: The evaluation options.
        prepare: prepare an external dataset's rows for the loaders (False: the film pass reads them; the run's own
            data is always prepared, its validation rows need the loaders).
    """
    run_folder = RunFolder.of(model)
    data_path = run_folder.data_path(opts.data)
    manifest = load_manifest(data_path)
    if manifest.empty:
        raise DatasetError(f"{data_path}: no images found")
    split_table, _ = run_folder.split()
    own = is_run_data(manifest, split_table)
    split = opts.split or ("test" if own else "all")
    settings = eval_settings(run_folder, opts, data_path)
    warnings: list[str] = []
    if own:
        run = load_own_data(model.classes, settings, split_table, split)
    else:
        labelled, warnings = match_labels(manifest, model.classes)
        run = load_external_data(model.classes, settings, labelled, split, prepare)
        seen = training_overlap((model.record.get("data") or {}).get("root"), split_table, run.table)
        run.table["seen_in_run"] = seen.values
    run_split = run.table["split"].astype(str).copy()
    roles = loader_roles(run_split, split, own)
    run = replace(run, table=run.table.assign(split=roles.values))
    return EvalData(run, run_split, own, data_path, split, warnings, manifest_record(data_path, manifest), settings)
