"""``python -m covidxr.evaluate``: evaluate a checkpoint with intervals, calibration, breakdowns and a report.

Usage::

    python -m covidxr.evaluate --checkpoint runs/r50/best.pt                     # test split of the run's data
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --split val
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --data other/ --split all   # external dataset

The run's own data (default: the data it was trained on, split as recorded in ``split.csv`` beside the checkpoint
or in the checkpoint) is evaluated on its ``test`` split by default. The validation split is predicted as well: a
temperature is fitted on it (temperature scaling) and the decision thresholds of the operating points are chosen
on it. The checkpoint then receives ``temperature`` and a compact ``evaluation`` summary (saved atomically).

A dataset whose images are not the run's split is *external*: all its images are evaluated (``--split all``), the
temperature and thresholds stored in the checkpoint are reused, images that were also in the run's data (same
path or same bytes) are flagged, and the checkpoint is left untouched.

Output folder (default ``eval/`` beside the checkpoint; ``eval-<dataset>/`` for an external dataset):
``metrics.json``, ``predictions.csv``, ``report.html`` (self-contained) and the PNG plots. Errors a user can cause
print one line ``covidxr.evaluate: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidxr import __version__
from covidxr.errors import CheckpointError, CovidxrError, DatasetError
from covidxr.files import file_digest, text_digest
from covidxr.utils import OneLineParser, int_at_least

log = logging.getLogger("covidxr.evaluate")

PROG = "covidxr.evaluate"
SPLITS = ("test", "val", "all")
EXTERNAL = "external"
META_COLUMNS = ("path", "relpath", "patient_id", "source", "view", "split")
PLOT_FILES = {
    "confusion_counts": "confusion_counts.png",
    "confusion_normalized": "confusion_normalized.png",
    "roc": "roc.png",
    "pr": "pr.png",
    "reliability": "reliability.png",
    "history": "history.png",
}
HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro")
TARGET_SENSITIVITIES = (0.90, 0.95)
EXPLAIN_SUMMARY = "explain_summary.csv"
SOURCE_CONFOUNDED = "this dataset cannot separate disease from source"
INTENDED_USE = ("Research and education only: a worked example of transfer learning and of evaluating a medical "
                "image classifier honestly. It is not a diagnostic device, has no regulatory clearance, and must "
                "not be used to diagnose, triage or treat anyone.")
LIMITATIONS = (
    "Public COVID-19 chest X-ray collections are confounded: the classes come from different sources (hospitals, "
    "papers, paediatric versus adult populations, image processing), so a network can score well by recognising "
    "the source instead of the disease. Breakdowns by source and the source-only baseline below show how much of "
    "the score the source alone explains.",
    "Labels come from case reports and the sources' own annotations, not from a reference standard applied to "
    "every image; some are wrong or ambiguous.",
    "Small test sets give wide intervals; the intervals resample patients, not images.",
    "Performance on another hospital, scanner or population is unknown until measured there (external "
    "evaluation), and calibration and thresholds chosen on this validation split may not transfer.",
)


# ---------------------------------------------------------------------------------------------------------- options


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


@dataclass
class Prediction:
    """Logits of the evaluated rows and of the validation rows used for calibration."""

    table: pd.DataFrame  # evaluated rows (manifest columns plus run_split)
    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    val_logits: np.ndarray | None  # (N_val, C), None without a validation split
    val_y: np.ndarray | None


@dataclass
class EvalData:
    """The rows to predict, prepared for the run's loaders."""

    run: Any  # covidxr.train.RunData whose ``split`` column holds the loader role (val, test or skip)
    run_split: pd.Series  # the run's split of each row (train/val/test), or "external"
    own: bool
    data_path: Path
    split: str
    warnings: list[str]
    manifest: dict[str, str]  # manifest_file, manifest_sha256


# ----------------------------------------------------------------------------------------------- small utilities


def git_state(folder: Path | None = None) -> dict[str, Any]:
    """Return the git commit of the code (``unknown`` outside a repository) and whether tracked files differ.

    Args:
        folder: Folder inside the repository (default: this package's folder).

    Returns:
        ``{"commit": str, "dirty": bool | None}``.
    """
    cwd = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars and NaN/inf to JSON-safe values, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _slug(text: str) -> str:
    """A file-name-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


# ------------------------------------------------------------------------------------------------ run and dataset


def run_split_table(checkpoint: Path, ckpt: dict[str, Any]) -> tuple[pd.DataFrame | None, str | None]:
    """Return the run's recorded split and where it came from.

    Args:
        checkpoint: The checkpoint file (``split.csv`` is looked for beside it).
        ckpt: The loaded checkpoint.

    Returns:
        ``(table with relpath, label, patient_id, split and maybe source/view, origin)``; ``(None, None)`` when the
        run recorded no split.
    """
    split_csv = checkpoint.parent / "split.csv"
    if split_csv.is_file():
        return pd.read_csv(split_csv, dtype=str, keep_default_na=False), str(split_csv)
    recorded = ckpt.get("split")
    if isinstance(recorded, dict) and "relpath" in recorded and "split" in recorded:
        return pd.DataFrame(recorded).astype(str), "checkpoint"
    return None, None


def training_data(ckpt: dict[str, Any]) -> str | None:
    """Return the dataset the checkpoint was trained on (``config.data``, else ``data.root``), or None."""
    config = ckpt.get("config") or {}
    data = ckpt.get("data") or {}
    return config.get("data") or data.get("root") or None


def manifest_record(data_path: Path, table: pd.DataFrame) -> dict[str, str]:
    """Return the SHA-256 of the manifest file (or of the listing of a scanned folder).

    Args:
        data_path: The dataset path (manifest CSV or folder).
        table: The loaded manifest.

    Returns:
        ``{"manifest_file", "manifest_sha256"}``.
    """
    from covidxr.data.manifest import MANIFEST_NAMES

    candidates = [data_path] if data_path.is_file() else [data_path / n for n in MANIFEST_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return {"manifest_file": str(candidate), "manifest_sha256": file_digest(candidate)}
    listing = "".join(f"{r},{lab}\n" for r, lab in sorted(zip(table["relpath"], table["label"], strict=True)))
    return {"manifest_file": "(folder listing: relpath,label per image)", "manifest_sha256": text_digest(listing)}


def is_run_data(table: pd.DataFrame, split: pd.DataFrame | None) -> bool:
    """Whether ``table`` holds every image of the run's split (matched on ``relpath``): the run's own data."""
    return split is not None and set(split["relpath"]) <= set(table["relpath"])


def eval_config(ckpt: dict[str, Any], opts: EvalOptions, data_path: Path) -> Any:
    """The run's training configuration with this evaluation's data, batch size, workers and device."""
    from covidxr.training.config import TrainConfig

    cfg = TrainConfig.from_dict(dict(ckpt.get("config") or {}))
    cfg.arch = ckpt["arch"]
    cfg.img_size = int(ckpt["preprocess"]["img_size"])
    cfg.data = str(data_path)
    cfg.batch_size, cfg.workers, cfg.device = opts.batch_size, opts.workers, opts.device
    return cfg


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


def load_own_data(ckpt: dict[str, Any], cfg: Any, split_table: pd.DataFrame, split: str) -> Any:
    """Load the run's data through ``covidxr.train.load_run_data`` with the recorded split.

    Args:
        ckpt: The checkpoint.
        cfg: The evaluation configuration (``eval_config``).
        split_table: The run's recorded split.
        split: The evaluated split.

    Returns:
        The ``RunData`` (``table`` carries the run's split).
    """
    from covidxr.data.split import save_split
    from covidxr.training.trainer import load_run_data

    with tempfile.TemporaryDirectory(prefix="covidxr-eval-") as tmp:
        save_split(split_table, Path(tmp) / "split.csv")
        data = load_run_data(cfg, Path(tmp), resuming=True)
    if data.classes != list(ckpt["classes"]):
        raise DatasetError(f"the run's data now has classes {data.classes}, the checkpoint {ckpt['classes']}")
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


def _training_paths(ckpt: dict[str, Any], split: pd.DataFrame | None) -> pd.DataFrame:
    """Absolute paths and splits of the run's images (relpaths resolved against the training root)."""
    if split is None:
        return pd.DataFrame(columns=["path", "split"])
    root = Path((ckpt.get("data") or {}).get("root") or ".")
    paths = [str(Path(r) if Path(r).is_absolute() else root / r) for r in split["relpath"]]
    return pd.DataFrame({"path": paths, "split": split["split"].tolist()})


def training_overlap(ckpt: dict[str, Any], split: pd.DataFrame | None, table: pd.DataFrame) -> pd.Series:
    """The run split of each external image that was also in the run's data (same path or same bytes).

    Args:
        ckpt: The checkpoint (``data.root`` resolves the run's relative paths).
        split: The run's recorded split.
        table: The external dataset (column ``path``).

    Returns:
        Series aligned with ``table``: ``train``/``val``/``test`` for images seen in the run, ``""`` otherwise.
    """

    runs = _training_paths(ckpt, split)
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


def load_external_data(ckpt: dict[str, Any], cfg: Any, table: pd.DataFrame, split: str) -> Any:
    """Prepare the selected rows of an external dataset for the run's loaders.

    Args:
        ckpt: The checkpoint.
        cfg: The evaluation configuration.
        table: The external manifest with labels mapped onto the checkpoint's classes.
        split: ``all``, or a value of the manifest's own ``split`` column (only those rows are kept).

    Returns:
        A ``RunData`` whose split column is "external".
    """
    from covidxr.data.cache import default_cache_dir, fill_cache
    from covidxr.data.manifest import dataset_root
    from covidxr.preprocess import cache_size
    from covidxr.training.trainer import RunData

    if split != "all":
        if "split" not in table.columns or not (table["split"] == split).any():
            raise DatasetError(f"--split {split}: an external dataset has no run split; its manifest has no "
                               f"{split!r} rows in a split column (use --split all)")
        table = table[table["split"] == split]
    table = table.assign(split=EXTERNAL).reset_index(drop=True)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    prepared = fill_cache(table["path"].tolist(), cache_size(cfg.img_size), cache_dir if cfg.cache else None,
                          workers=min(cfg.workers, 8), desc="prepare images")
    unreadable = {table["relpath"].iloc[i]: reason for i, reason in prepared.failures.items()}
    keep = np.array([i not in prepared.failures for i in range(len(table))], dtype=bool)
    images = [img for img, ok in zip(prepared.images, keep, strict=True) if ok] if cfg.cache else None
    root = dataset_root(Path(cfg.data))
    return RunData(table[keep].reset_index(drop=True), list(ckpt["classes"]), root, images, unreadable)


def load_eval_data(ckpt: dict[str, Any], checkpoint: Path, opts: EvalOptions) -> tuple[EvalData, Any]:
    """Resolve the dataset, decide whether it is the run's own data, and prepare the rows to predict.

    Args:
        ckpt: The checkpoint.
        checkpoint: Its file.
        opts: The evaluation options.

    Returns:
        ``(EvalData, evaluation config)``.
    """
    from covidxr.data.manifest import load_manifest, resolve_data_path

    data_path = resolve_data_path(opts.data or training_data(ckpt))
    manifest = load_manifest(data_path)
    if manifest.empty:
        raise DatasetError(f"{data_path}: no images found")
    split_table, _ = run_split_table(checkpoint, ckpt)
    own = is_run_data(manifest, split_table)
    split = opts.split or ("test" if own else "all")
    cfg = eval_config(ckpt, opts, data_path)
    warnings: list[str] = []
    if own:
        run = load_own_data(ckpt, cfg, split_table, split)
    else:
        labelled, warnings = match_labels(manifest, ckpt["classes"])
        run = load_external_data(ckpt, cfg, labelled, split)
        seen = training_overlap(ckpt, split_table, run.table)
        run.table["seen_in_run"] = seen.values
    run_split = run.table["split"].astype(str).copy()
    roles = loader_roles(run_split, split, own)
    run = replace(run, table=run.table.assign(split=roles.values))
    return EvalData(run, run_split, own, data_path, split, warnings, manifest_record(data_path, manifest)), cfg


# ----------------------------------------------------------------------------------------------------- prediction


def build_eval_model(ckpt: dict[str, Any], device: Any) -> Any:
    """Rebuild the checkpoint's model in eval mode on ``device``."""
    from covidxr.models import model_from_checkpoint

    return model_from_checkpoint(ckpt, str(ckpt.get("path", "checkpoint"))).to(device).eval()


def predict(ckpt: dict[str, Any], data: EvalData, cfg: Any) -> Prediction:
    """Predict logits for the validation and evaluated rows with the run's loaders.

    Args:
        ckpt: The checkpoint.
        data: The prepared rows (``data.run.table.split`` is the loader role).
        cfg: The evaluation configuration.

    Returns:
        The evaluated rows' logits and labels, and the validation rows' (None when there are none).
    """
    import torch

    from covidxr.training import engine
    from covidxr.training.trainer import make_loaders
    from covidxr.utils import amp_dtype, autocast, pick_device

    device = pick_device(cfg.device)
    model = build_eval_model(ckpt, device)
    channels_last = bool(cfg.channels_last) and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = autocast(device, amp_dtype(device) if cfg.amp else None)
    table = data.run.table
    roles = table["split"].to_numpy()
    index = {c: i for i, c in enumerate(ckpt["classes"])}
    logits = np.full((len(table), len(index)), np.nan)
    for role, loader in make_loaders(data.run, cfg, device, cfg.seed).items():
        out = engine.predict_loader(model, loader, device, amp, desc=f"predict {role}", channels_last=channels_last)
        logits[np.flatnonzero(roles == role)[out.indices]] = out.logits
    y = table["label"].map(index).to_numpy(dtype=np.int64)
    if data.own and data.split == "val":
        evaluated = roles == "val"
    else:
        evaluated = roles != "skip" if data.own and data.split == "all" else roles == "test"
    has_val = data.own and (roles == "val").any()
    rows = table[evaluated].assign(split=data.run_split[evaluated].values)
    return Prediction(rows.reset_index(drop=True), logits[evaluated], y[evaluated],
                      logits[roles == "val"] if has_val else None, y[roles == "val"] if has_val else None)


# ------------------------------------------------------------------------------------------------------ analysis


def calibrate(pred: Prediction, ckpt: dict[str, Any]) -> tuple[float, str]:
    """Fit a temperature on the validation logits, or reuse the checkpoint's (external data).

    Args:
        pred: The predictions.
        ckpt: The checkpoint.

    Returns:
        ``(temperature, how it was obtained)``.
    """
    from covidxr.evaluation.metrics import fit_temperature

    if pred.val_logits is not None and len(pred.val_y):
        temperature = fit_temperature(pred.val_logits, pred.val_y)
        return temperature, f"fitted on the run's validation split ({len(pred.val_y)} images)"
    stored = ckpt.get("temperature")
    if isinstance(stored, (int, float)) and math.isfinite(stored) and stored > 0:
        return float(stored), "reused from the checkpoint (fitted on the run's validation split); not refitted"
    return 1.0, "none: no validation split and no temperature in the checkpoint (probabilities uncalibrated)"


def default_positive(classes: Sequence[str], requested: str | None) -> str | None:
    """The positive class of the operating points: ``requested``, else the class named like 'covid', else None.

    Raises:
        DatasetError: ``requested`` is not a class.
    """
    if requested is not None:
        if requested not in classes:
            raise DatasetError(f"--positive {requested!r} is not a class of the model ({', '.join(classes)})")
        return requested
    return next((c for c in classes if "covid" in c.lower()), None)


def _apply_thresholds(stored: list[dict[str, Any]], y_bin: np.ndarray, score: np.ndarray) -> list[dict[str, Any]]:
    """Report thresholds chosen earlier (on the run's validation split) on new data."""
    out = []
    for point in stored:
        row = {k: point.get(k) for k in ("target_sensitivity", "threshold", "val_sensitivity", "val_specificity",
                                         "val_counts")}
        row |= {"test_sensitivity": None, "test_specificity": None, "test_counts": None, "reason": None}
        if row["threshold"] is not None:
            called = score >= float(row["threshold"])
            counts = {"tp": int(np.sum(called & y_bin)), "fn": int(np.sum(~called & y_bin)),
                      "tn": int(np.sum(~called & ~y_bin)), "fp": int(np.sum(called & ~y_bin))}
            pos, neg = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
            row |= {"test_counts": counts, "test_sensitivity": counts["tp"] / pos if pos else None,
                    "test_specificity": counts["tn"] / neg if neg else None}
            row["reason"] = None if pos and neg else "the evaluated data lacks positives or negatives"
        out.append(row)
    return out


def operating_point_table(pred: Prediction, probs: np.ndarray, val_probs: np.ndarray | None, classes: Sequence[str],
                          positive: str | None, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """Thresholds for 90%/95% sensitivity of the positive class, chosen on validation and reported on test.

    Args:
        pred: The predictions.
        probs: Calibrated probabilities of the evaluated rows.
        val_probs: Calibrated probabilities of the validation rows, or None (then the checkpoint's stored thresholds
            are reused).
        classes: Class names.
        positive: The positive class, or None.
        ckpt: The checkpoint.

    Returns:
        ``{"positive", "score", "chosen_on", "points"}`` or None (no positive class, or nothing to choose on).
    """
    from covidxr.evaluation.metrics import operating_points

    if positive is None:
        return None
    k = list(classes).index(positive)
    score = f"temperature-scaled probability of {positive!r} (positive when >= threshold)"
    if val_probs is not None:
        points = operating_points(pred.val_y == k, val_probs[:, k], pred.y == k, probs[:, k], TARGET_SENSITIVITIES)
        return {"positive": positive, "score": score, "chosen_on": "val", "points": points}
    stored = ((ckpt.get("evaluation") or {}).get("operating_points") or {})
    if stored.get("positive") != positive or not stored.get("points"):
        return None
    points = _apply_thresholds(stored["points"], pred.y == k, probs[:, k])
    return {"positive": positive, "score": score, "chosen_on": "checkpoint (the run's validation split)",
            "points": points}


def breakdown(pred: Prediction, probs: np.ndarray, classes: Sequence[str], column: str) -> dict[str, Any] | None:
    """``group_metrics`` per value of a manifest column, or None when the column is empty."""
    from covidxr.evaluation.metrics import group_metrics

    if column not in pred.table.columns:
        return None
    values = pred.table[column].fillna("").astype(str).str.strip()
    if (values == "").all():
        return None
    return group_metrics(pred.y, probs, classes, values.replace("", "(unknown)").tolist())


def column_baseline(train: pd.DataFrame | None, rows: pd.DataFrame, y: np.ndarray, classes: Sequence[str],
                    column: str) -> dict[str, Any] | None:
    """Metrics of a 'classifier' that sees only one metadata column (e.g. the source), learned on the run's train split.

    ``P(class | value)`` is estimated with add-one smoothing from the run's training images; unseen values get the
    training class prior. A high score here means the column alone predicts the label: the data is confounded.

    Args:
        train: The run's training rows (with ``label`` and ``column``), or None.
        rows: The evaluated rows.
        y: Their labels.
        classes: Class names.
        column: The metadata column.

    Returns:
        ``{"column", "accuracy", "balanced_accuracy", "roc_auc_macro"}`` or None (no such information).
    """
    from covidxr.evaluation.metrics import classification_metrics

    if train is None or train.empty or column not in train.columns or column not in rows.columns:
        return None
    if (rows[column].fillna("").astype(str).str.strip() == "").all():
        return None
    counts = pd.crosstab(train[column].astype(str), train["label"]).reindex(columns=list(classes), fill_value=0)
    if counts.shape[0] < 2:
        return None
    table = (counts + 1).div((counts + 1).sum(axis=1), axis=0)
    prior = (counts.sum(axis=0) + 1) / (counts.to_numpy().sum() + len(classes))
    probs = np.stack([table.loc[v].to_numpy() if v in table.index else prior.to_numpy()
                      for v in rows[column].astype(str)])
    m = classification_metrics(y, probs, classes)
    return {"column": column, "learned_on": f"run's train split ({len(train)} images)",
            **{k: m[k] for k in ("accuracy", "balanced_accuracy", "roc_auc_macro")}}


def source_warnings(table: pd.DataFrame) -> list[str]:
    """Confounding of class and source in ``table``, with the plain verdict when it is total.

    A class whose images all come from one source, or a source that gives a single class, makes disease and source
    inseparable: the report says so first. ``covidxr.data.confounding.confounding_warnings`` adds the details.

    Args:
        table: Rows with ``label`` and ``source``.

    Returns:
        Warnings (empty when none).
    """
    from covidxr.data.confounding import confounding_warnings

    sources = table["source"].fillna("").astype(str).str.strip() if "source" in table else pd.Series(dtype=str)
    known = sources != ""
    details = confounding_warnings(table)
    if not known.any() or sources[known].nunique() < 2:
        return details
    counts = pd.crosstab(table.loc[known, "label"], sources[known]) > 0
    single_source = [f"{c!r} (only {counts.columns[row.to_numpy()][0]!r})"
                     for c, row in counts.iterrows() if row.sum() == 1]
    single_class = [f"{s!r} (only {counts.index[col.to_numpy()][0]!r})" for s, col in counts.items()
                    if col.sum() == 1 and counts.shape[0] > 1]
    if not single_source and not single_class:
        return details
    parts = ([f"class(es) from a single source: {', '.join(single_source)}"] if single_source else []) + (
        [f"source(s) with a single class: {', '.join(single_class)}"] if single_class else [])
    return [f"{SOURCE_CONFOUNDED}: {'; '.join(parts)}. A high score may come from recognising the source "
            "(hospital, age group, image processing) rather than the disease."] + details


def split_warnings(data: EvalData, pred: Prediction, temperature_how: str) -> list[str]:
    """Caveats about what was evaluated: in-sample calibration, training images, overlap, unreadable files."""
    out = list(data.warnings)
    if data.own and data.split == "val":
        out.append("the validation split is evaluated: the temperature and thresholds were fitted on it, so "
                   "calibration and operating points are optimistic (in-sample)")
    if data.own and data.split == "all":
        out.append("--split all includes the run's training images: these metrics are optimistic, use --split test")
    if not data.own and "seen_in_run" in pred.table:
        seen = pred.table["seen_in_run"].astype(str)
        if (seen != "").any():
            by = seen[seen != ""].value_counts().to_dict()
            out.append(f"{int((seen != '').sum())} of {len(seen)} external images were in the run's own data "
                       f"(same path or identical bytes; by run split: {by}): metrics on them are not external")
    if not temperature_how.startswith("fitted"):
        out.append(f"temperature {temperature_how}")
    if data.run.unreadable:
        out.append(f"{len(data.run.unreadable)} unreadable image(s) skipped (listed in metrics.json 'unreadable')")
    if pred.table["patient_id"].astype(str).str.startswith("image:").all():
        out.append("no patient ids: every image is treated as its own patient in the bootstrap (intervals are too "
                   "narrow if patients have several images)")
    return out


# ---------------------------------------------------------------------------------------------------------- outputs


def predictions_frame(pred: Prediction, probs: np.ndarray, raw: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per evaluated image: metadata, true and predicted label, calibrated and raw probabilities."""
    columns = [c for c in META_COLUMNS if c in pred.table.columns]
    out = pred.table[columns].copy()
    if "seen_in_run" in pred.table:
        out["seen_in_run"] = pred.table["seen_in_run"].values
    out["label"] = pred.table["label"].values
    out["predicted"] = [classes[k] for k in probs.argmax(axis=1)]
    for k, name in enumerate(classes):
        out[name] = probs[:, k]
    for k, name in enumerate(classes):
        out[f"raw_{name}"] = raw[:, k]
    return out


def load_history(checkpoint: Path, ckpt: dict[str, Any]) -> pd.DataFrame | None:
    """The training history: ``history.csv`` beside the checkpoint, else the checkpoint's, else None."""
    path = checkpoint.parent / "history.csv"
    if path.is_file():
        try:
            history = pd.read_csv(path)
            return history if not history.empty else None
        except (OSError, ValueError, pd.errors.ParserError):
            log.warning("cannot read %s; using the checkpoint's history", path)
    rows = ckpt.get("history") or []
    return pd.DataFrame(rows) if rows else None


def make_plots(out: Path, pred: Prediction, probs: np.ndarray, raw: np.ndarray, classes: Sequence[str],
               cm: list[list[int]], history: pd.DataFrame | None) -> dict[str, tuple[str, bytes]]:
    """Render and save the PNG plots.

    Returns:
        ``{name: (file name, PNG bytes)}``.
    """
    from covidxr.evaluation import plots as rep
    from covidxr.files import atomic_write_bytes

    figures: dict[str, Callable[[], Any]] = {
        "confusion_counts": lambda: rep.plot_confusion_matrix(cm, classes, normalize=False),
        "confusion_normalized": lambda: rep.plot_confusion_matrix(cm, classes, normalize=True),
        "roc": lambda: rep.plot_roc_curves(pred.y, probs, classes),
        "pr": lambda: rep.plot_pr_curves(pred.y, probs, classes),
        "reliability": lambda: rep.plot_reliability(pred.y, raw, probs),
    }
    if history is not None:
        figures["history"] = lambda: rep.plot_history(history)
    plots = {}
    for name, make in figures.items():
        png = rep.figure_png(make())
        atomic_write_bytes(out / PLOT_FILES[name], png)  # world-readable like the other outputs (0644)
        plots[name] = (PLOT_FILES[name], png)
    return plots


def read_explain(out: Path) -> list[dict[str, Any]] | None:
    """The rows of ``explain_summary.csv`` in the evaluation folder (written by ``covidxr.explain score``), or None."""
    path = out / EXPLAIN_SUMMARY
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        log.warning("cannot read %s (%s)", path, exc)
        return None
    return _jsonable(frame.astype(object).where(frame.notna(), None).to_dict("records"))


def model_card(ckpt: dict[str, Any], data: EvalData, evaluated: pd.DataFrame, split_table: pd.DataFrame | None,
               metrics: dict[str, Any], ci: dict[str, Any] | None) -> dict[str, Any]:
    """The model card: data, intended use, limitations, architecture and training, headline metrics.

    Args:
        ckpt: The checkpoint.
        data: The evaluation data.
        evaluated: The evaluated rows.
        split_table: The run's split (counts of the training data), or None.
        metrics: Calibrated metrics of the evaluated split.
        ci: Bootstrap intervals, or None.

    Returns:
        A JSON-safe dict.
    """
    cfg = ckpt.get("config") or {}
    run_rows = split_table if split_table is not None else pd.DataFrame(columns=["label", "split", "patient_id"])
    card_data: dict[str, Any] = {
        "training_data": training_data(ckpt),
        "images": int(len(run_rows)),
        "patients": int(run_rows["patient_id"].nunique()) if len(run_rows) else 0,
        "split_counts": _crosstab(run_rows, "split", "label"),
        "patients_per_class": run_rows.groupby("label")["patient_id"].nunique().astype(int).to_dict(),
        "class_by_source": _crosstab(run_rows, "label", "source"),
        "confounding": source_warnings(run_rows) if "source" in run_rows and len(run_rows) else [],
        "evaluated": {"dataset": str(data.data_path), "external": not data.own, "split": data.split,
                      "images": int(len(evaluated)), "patients": int(evaluated["patient_id"].nunique()),
                      "class_by_source": _crosstab(evaluated, "label", "source")},
    }
    keys = ("weights", "epochs", "batch_size", "lr", "backbone_lr_scale", "weight_decay", "warmup_epochs",
            "freeze_epochs", "patience", "balance", "label_smoothing", "val_frac", "test_frac", "holdout_source",
            "exclude_source", "exclude_where", "seed")
    model = {"arch": ckpt["arch"], "classes": list(ckpt["classes"]), "img_size": ckpt["preprocess"].get("img_size"),
             "preprocess": ckpt["preprocess"], "epochs_trained": ckpt.get("epoch"),
             "best_epoch": ckpt.get("best_epoch"), "best_val_macro_auc": ckpt.get("best_auc"),
             "training": {k: cfg.get(k) for k in keys if k in cfg}, "created": ckpt.get("created")}
    headline = {k: (ci["metrics"][k] if ci else metrics.get(k)) for k in HEADLINE}
    return _jsonable({"data": card_data, "intended_use": INTENDED_USE, "limitations": list(LIMITATIONS),
                      "model": model, "headline": headline})


def _crosstab(table: pd.DataFrame, rows: str, cols: str) -> dict[str, dict[str, int]]:
    """Counts of ``rows`` x ``cols`` as a nested dict (empty when a column is missing or blank)."""
    if table.empty or rows not in table.columns or cols not in table.columns:
        return {}
    values = table[cols].fillna("").astype(str).replace("", "(unknown)")
    counts = pd.crosstab(table[rows].astype(str), values)
    return {str(r): {str(c): int(v) for c, v in row.items() if v} for r, row in counts.iterrows()}


# ----------------------------------------------------------------------------------------------------------- report


def _metric_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the headline table: calibrated value with interval, uncalibrated value."""
    ci = (result["ci"] or {}).get("metrics", {})
    rows = []
    for name in (*HEADLINE, "average_precision_macro", "f1_weighted", "cohen_kappa", "mcc", "brier", "log_loss",
                 "ece"):
        rows.append({"metric": name.replace("_", " "), "value": ci.get(name) or result["metrics"].get(name),
                     "uncalibrated": result["metrics_uncalibrated"].get(name)})
    return rows


def _per_class_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the per-class table, with sensitivity and specificity intervals when bootstrapped."""
    ci = (result["ci"] or {}).get("per_class", {})
    rows = []
    for name, m in result["metrics"]["per_class"].items():
        rows.append({"class": name, "support": m["support"], "n_predicted": m["n_predicted"],
                     "sensitivity": ci.get(name, {}).get("sensitivity") or m["recall"],
                     "specificity": ci.get(name, {}).get("specificity") or m["specificity"],
                     "precision": m["precision"], "npv": m["npv"], "f1": m["f1"], "roc_auc": m["roc_auc"],
                     "average_precision": m["average_precision"]})
    return rows


def _group_section(title: str, groups: dict[str, Any] | None, classes: Sequence[str]) -> str:
    """HTML table of ``group_metrics`` output (empty string when None)."""
    from covidxr.html_page import table_html

    if not groups:
        return ""
    rows = [{"group": g, **{k: v[k] for k in ("n", "small", "class_counts", "accuracy", "balanced_accuracy",
                                              "roc_auc_macro")},
             **{f"sens_{c}": v["per_class"][c]["sensitivity"] for c in classes}} for g, v in groups.items()]
    columns = ["group", "n", ("small", "n < 30"), ("class_counts", "images per class"), "accuracy",
               ("balanced_accuracy", "balanced acc."), ("roc_auc_macro", "macro ROC-AUC"),
               *[(f"sens_{c}", f"sensitivity {c}") for c in classes]]
    return table_html(rows, columns, caption=title)


def _figure(plots: dict[str, tuple[str, bytes]], name: str, caption: str) -> str:
    """An embedded plot, or nothing when it was not made."""
    from covidxr.html_page import img_html

    return img_html(plots[name][1], alt=name, caption=f"{caption} ({plots[name][0]})") if name in plots else ""


def _calibration_html(result: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> str:
    """Calibration section: temperature, ECE and Brier score before and after, reliability diagram."""
    from covidxr.html_page import kv_html, paragraph_html

    cal = result["calibration"]
    text = (f"Temperature scaling divides the logits by T = {cal['temperature']:.3f} ({cal['how']}). It changes "
            "confidence, not the predicted class of any image, so accuracy, sensitivity and specificity are unchanged; "
            "one-vs-rest ROC-AUC can move slightly because a class's probability is compared across images. ECE and "
            f"Brier score below are measured on the evaluated split ({result['split']}).")
    return paragraph_html(text) + kv_html({k: cal[k] for k in ("temperature", "ece_before", "ece_after",
                                                               "brier_before", "brier_after")}) + \
        _figure(plots, "reliability", "Reliability diagram before and after temperature scaling")


def _operating_html(ops: dict[str, Any] | None) -> str:
    """Operating-point table, or a sentence saying why there is none."""
    from covidxr.html_page import paragraph_html, table_html

    if not ops:
        return paragraph_html("No operating points: no positive class (pass --positive CLASS) or no validation "
                              "split and no thresholds stored in the checkpoint.")
    intro = paragraph_html(f"Positive class {ops['positive']!r}; score: {ops['score']}. Thresholds chosen on "
                           f"{ops['chosen_on']} for the target sensitivity, then applied unchanged to the "
                           "evaluated split.")
    columns = ["target_sensitivity", "threshold", "val_sensitivity", "val_specificity", "test_sensitivity",
               "test_specificity", "test_counts", "reason"]
    return intro + table_html(ops["points"], columns, digits=3)


def _confounding_html(result: dict[str, Any]) -> str:
    """Baselines that see only a metadata column, and the breakdowns by source and by view."""
    from covidxr.html_page import paragraph_html, table_html

    parts = [paragraph_html("A 'classifier' that sees only the source (or the view) of an image, learned on the "
                            "run's training images. If it scores close to the model, the model's score says little "
                            "about the disease.")]
    baselines = [b for b in (result.get("baselines") or {}).values() if b]
    if baselines:
        parts.append(table_html(baselines, ["column", "learned_on", "accuracy", "balanced_accuracy",
                                            "roc_auc_macro"], caption="Metadata-only baselines"))
    else:
        parts.append(paragraph_html("No metadata-only baseline: the run's split has no source/view information."))
    classes = result["classes"]
    parts.append(_group_section("Metrics by data source", result["by_source"], classes))
    parts.append(_group_section("Metrics by view position", result["by_view"], classes))
    if not result["by_source"] and not result["by_view"]:
        parts.append(paragraph_html("The dataset records no source or view: no breakdown possible."))
    return "\n".join(parts)


def _model_card_html(card: dict[str, Any], explain: list[dict[str, Any]] | None) -> str:
    """Model card section."""
    from covidxr.html_page import kv_html, paragraph_html, table_html

    data = card["data"]
    split_rows = [{"split": s, **counts} for s, counts in data["split_counts"].items()]
    classes = card["model"]["classes"]
    source_rows = [{"class": c, "by source": counts} for c, counts in data["class_by_source"].items()]
    parts = [
        "<h3>Intended use</h3>", paragraph_html(card["intended_use"]),
        "<h3>Limitations</h3>", "<ul>" + "".join(f"<li>{_esc(t)}</li>" for t in card["limitations"]) + "</ul>",
        "<h3>Data</h3>",
        kv_html({"training data": data["training_data"], "images": data["images"], "patients": data["patients"],
                 "patients per class": data["patients_per_class"], "evaluated dataset": data["evaluated"]["dataset"],
                 "external": data["evaluated"]["external"], "evaluated split": data["evaluated"]["split"]}),
        table_html(split_rows, ["split", *classes], caption="Images per split and class (run's data)"),
        table_html(source_rows, ["class", "by source"], caption="Images per class and source (run's data)"),
        *[paragraph_html(f"Warning: {w}") for w in data["confounding"]],
        "<h3>Architecture and training</h3>",
        kv_html({k: v for k, v in card["model"].items() if k not in ("training", "preprocess")}),
        kv_html(card["model"]["training"], caption="Training settings", digits=6),
        "<h3>Headline metrics (95% patient-bootstrap intervals)</h3>", kv_html(card["headline"]),
    ]
    if explain:
        parts += ["<h3>Explanations (Grad-CAM summary)</h3>",
                  table_html(explain, list(explain[0].keys()), caption=EXPLAIN_SUMMARY)]
    return "\n".join(parts)


def _esc(text: str) -> str:
    """HTML-escape text."""
    return html.escape(str(text))


def build_report(result: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> str:
    """Assemble the self-contained HTML report from the metrics.json content and the rendered plots."""
    from covidxr.html_page import Section, kv_html, paragraph_html, render_html, table_html

    ci = (result["ci"] or {}).get("metrics", {})
    headline = {k.replace("_", " "): ci.get(k) or result["metrics"].get(k) for k in HEADLINE}
    warnings = "".join(f'<p style="color:#9c1f1f"><strong>Warning:</strong> {_esc(w)}</p>'
                       for w in result["warnings"]) or paragraph_html("No warnings.")
    sections = [
        Section("Warnings", warnings),
        Section("Metrics", table_html(_metric_rows(result), ["metric", ("value", "value (95% CI)"), "uncalibrated"],
                                      caption=f"{result['split']} split, {result['n_images']} images, "
                                              f"{result['n_patients']} patients")
                + table_html(_per_class_rows(result), ["class", "support", "n_predicted", "sensitivity",
                                                       "specificity", "precision", "npv", "f1", "roc_auc",
                                                       "average_precision"], caption="Per class")),
        Section("Confusion matrix", _figure(plots, "confusion_counts", "Counts")
                + _figure(plots, "confusion_normalized", "Row-normalised (recall on the diagonal)")),
        Section("ROC and precision-recall", _figure(plots, "roc", "ROC curves, one-vs-rest")
                + _figure(plots, "pr", "Precision-recall curves, one-vs-rest")),
        Section("Calibration", _calibration_html(result, plots)),
        Section("Operating points", _operating_html(result["operating_points"])),
        Section("Confounding checks", _confounding_html(result)),
        Section("Training", _figure(plots, "history", "Training curves (history.csv)")
                or paragraph_html("No training history recorded.")),
        Section("Model card", _model_card_html(result["model_card"], result["explain"])),
    ]
    if result["unreadable"]:
        rows = [{"relpath": k, "reason": v} for k, v in result["unreadable"].items()]
        sections.append(Section("Unreadable files", table_html(rows, ["relpath", "reason"])))
    sections.append(Section("Reproducibility", kv_html(result["reproducibility"])))
    subtitle = (f"{result['model_card']['model']['arch']} · {result['checkpoint']} · {result['split']} split of "
                f"{result['model_card']['data']['evaluated']['dataset']} · {result['reproducibility']['created']}")
    return render_html(sections, title="Chest X-ray classifier evaluation", subtitle=subtitle, headline=headline)


# ------------------------------------------------------------------------------------------------------- evaluation


def analyse(ckpt: dict[str, Any], data: EvalData, pred: Prediction, split_table: pd.DataFrame | None,
            opts: EvalOptions) -> dict[str, Any]:
    """Compute every number of the evaluation from the logits.

    Returns:
        The analysis part of metrics.json plus ``_probs`` and ``_raw`` (probability arrays, not serialised).
    """
    from covidxr.evaluation.metrics import bootstrap_ci, classification_metrics
    from covidxr.utils import softmax

    classes = list(ckpt["classes"])
    temperature, how = calibrate(pred, ckpt)
    raw, probs = softmax(pred.logits), softmax(pred.logits, temperature)
    val_probs = softmax(pred.val_logits, temperature) if pred.val_logits is not None else None
    metrics = classification_metrics(pred.y, probs, classes)
    uncal = classification_metrics(pred.y, raw, classes)
    groups = pred.table["patient_id"].astype(str).tolist()
    ci = bootstrap_ci(pred.y, probs, groups, classes, opts.bootstrap, opts.seed) if opts.bootstrap else None
    train = split_table[split_table["split"] == "train"] if split_table is not None else None
    calibration = {"temperature": temperature, "how": how, "ece_before": uncal["ece"], "ece_after": metrics["ece"],
                   "brier_before": uncal["brier"], "brier_after": metrics["brier"], "n_bins": 15,
                   "measured_on": data.split}
    return {
        "metrics": metrics, "metrics_uncalibrated": uncal, "ci": ci, "calibration": calibration,
        "operating_points": operating_point_table(pred, probs, val_probs, classes,
                                                  default_positive(classes, opts.positive), ckpt),
        "by_source": breakdown(pred, probs, classes, "source"), "by_view": breakdown(pred, probs, classes, "view"),
        "baselines": {c: column_baseline(train, pred.table, pred.y, classes, c) for c in ("source", "view")},
        "_probs": probs, "_raw": raw,
    }


def default_out(checkpoint: Path, data: EvalData) -> Path:
    """``eval/`` beside the checkpoint for the run's data, ``eval-<dataset>/`` for an external dataset."""
    if data.own:
        return checkpoint.parent / "eval"
    path = data.data_path
    name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
    return checkpoint.parent / f"eval-{_slug(name)}"


def evaluation_summary(result: dict[str, Any], checkpoint: Path, out: Path) -> dict[str, Any]:
    """The compact summary stored in the checkpoint (``ckpt["evaluation"]``) and in metrics.json (``summary``)."""
    metrics = result["metrics"]
    base = checkpoint.parent
    return _jsonable({
        "split": result["split"], "n_images": result["n_images"], "n_patients": result["n_patients"],
        "dataset": result["model_card"]["data"]["evaluated"]["dataset"],
        "metrics": {**{k: metrics[k] for k in (*HEADLINE, "average_precision_macro", "ece", "brier")},
                    "per_class": metrics["per_class"]},
        "ci": result["ci"], "calibration": result["calibration"], "operating_points": result["operating_points"],
        "report": os.path.relpath(out / "report.html", base),
        "metrics_json": os.path.relpath(out / "metrics.json", base),
        "checkpoint_sha256": result["checkpoint_sha256"], "created": result["reproducibility"]["created"],
    })


def update_checkpoint(checkpoint: Path, ckpt: dict[str, Any], sha_before: str, temperature: float,
                      summary: dict[str, Any]) -> str:
    """Store the temperature and the evaluation summary in the checkpoint (atomic write); return its new SHA-256.

    Raises:
        CheckpointError: The file changed since it was evaluated (it is then left alone).
    """
    from covidxr.checkpoint import save_checkpoint

    if file_digest(checkpoint) != sha_before:
        raise CheckpointError(f"{checkpoint}: changed during the evaluation; not updated (evaluate again)")
    save_checkpoint(checkpoint, {**ckpt, "temperature": float(temperature), "evaluation": summary})
    return file_digest(checkpoint)


def reproducibility(opts: EvalOptions, ckpt: dict[str, Any], data: EvalData, split_table: pd.DataFrame | None,
                    sha: str, timings: dict[str, float]) -> dict[str, Any]:
    """The record that lets someone repeat this evaluation."""
    from covidxr.utils import library_versions

    split_csv = opts.checkpoint.parent / "split.csv"
    if split_csv.is_file():
        split_sha, split_from = file_digest(split_csv), str(split_csv)
    elif split_table is not None:
        split_sha, split_from = text_digest(split_table.to_csv(index=False)), "checkpoint (as CSV)"
    else:
        split_sha, split_from = None, None
    git = git_state()
    return _jsonable({
        "covidxr_version": __version__, "git_commit": git["commit"], "git_dirty": git["dirty"],
        "command": list(opts.command or sys.argv), "command_line": shlex.join(opts.command or sys.argv),
        "argv": list(sys.argv),
        "config": ckpt.get("config"), "data": str(data.data_path),
        **data.manifest,
        "split_table_sha256": split_sha, "split_table": split_from, "checkpoint": str(opts.checkpoint),
        "checkpoint_sha256": sha, "library_versions": library_versions(),
        "seeds": {"bootstrap": opts.seed, "training": (ckpt.get("config") or {}).get("seed")},
        "bootstrap": {"n_resamples": opts.bootstrap, "seed": opts.seed, "unit": "patient", "alpha": 0.05},
        "device": opts.device, "batch_size": opts.batch_size, "workers": opts.workers,
        "timings_seconds": dict(timings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def assemble(ckpt: dict[str, Any], data: EvalData, pred: Prediction, analysis: dict[str, Any],
             split_table: pd.DataFrame | None, opts: EvalOptions, sha: str, out: Path) -> dict[str, Any]:
    """Put the metrics.json content together (without plots and final timings)."""
    result = {k: v for k, v in analysis.items() if not k.startswith("_")}
    warnings = source_warnings(pred.table) + split_warnings(data, pred, result["calibration"]["how"])
    if result["ci"] is None:
        warnings.append("--bootstrap 0: no confidence intervals")
    return {
        "checkpoint": str(opts.checkpoint), "checkpoint_sha256": sha, "split": data.split,
        "data": str(data.data_path), "external": not data.own, "n_images": int(len(pred.y)),
        "n_patients": int(pred.table["patient_id"].nunique()), "classes": list(ckpt["classes"]),
        **result, "plots": {}, "reproducibility": {}, "warnings": warnings, "explain": read_explain(out),
        "unreadable": dict(data.run.unreadable),
        "model_card": model_card(ckpt, data, pred.table, split_table, result["metrics"], result["ci"]),
    }


def write_outputs(out: Path, result: dict[str, Any], pred: Prediction, analysis: dict[str, Any],
                  history: pd.DataFrame | None) -> None:
    """Write predictions.csv, the PNG plots and report.html (metrics.json is written last, by the caller)."""
    from covidxr.files import atomic_write_bytes, atomic_write_text

    classes = result["classes"]
    frame = predictions_frame(pred, analysis["_probs"], analysis["_raw"], classes)
    atomic_write_bytes(out / "predictions.csv", frame.to_csv(index=False).encode("utf-8"))
    plots = make_plots(out, pred, analysis["_probs"], analysis["_raw"], classes,
                       result["metrics"]["confusion_matrix"], history)
    result["plots"] = {name: file for name, (file, _) in plots.items()}
    atomic_write_text(out / "report.html", build_report(result, plots))


class _Stages:
    """A progress bar over the evaluation's stages that also times them."""

    def __init__(self, total: int, progress: bool) -> None:
        self.bar = tqdm(total=total, desc="evaluate", disable=None if progress else True, leave=False)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Run one stage: show its name, time it, advance the bar."""
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.bar.update(1)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``load_checkpoint`` that turns any unpickling failure into a one-line ``CheckpointError``."""
    from covidxr.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except CovidxrError:
        raise
    except Exception as exc:  # torch.load raises many types on arbitrary bytes (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from exc


def finish(out: Path, result: dict[str, Any], ckpt: dict[str, Any], data: EvalData, pred: Prediction,
           analysis: dict[str, Any], opts: EvalOptions) -> None:
    """Write predictions, plots and report; store the summary in the checkpoint when it is the run's own data."""
    write_outputs(out, result, pred, analysis, load_history(opts.checkpoint, ckpt))
    result["summary"] = evaluation_summary(result, opts.checkpoint, out)
    if data.own:
        after = update_checkpoint(opts.checkpoint, ckpt, result["checkpoint_sha256"],
                                  result["calibration"]["temperature"], result["summary"])
        result["reproducibility"]["checkpoint_sha256_after_update"] = after


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate a checkpoint and write metrics.json, predictions.csv, report.html and the plots.

    Args:
        opts: The options (``opts.checkpoint`` is required).

    Returns:
        The content of metrics.json plus ``"out"``, the output folder.

    Raises:
        CovidxrError: Unusable checkpoint, dataset or options (one-line message).
    """
    from covidxr.files import atomic_write_text
    from covidxr.utils import pick_device

    start = time.perf_counter()
    opts = replace(opts, checkpoint=Path(opts.checkpoint).expanduser().resolve())
    ckpt = read_checkpoint(opts.checkpoint)
    sha = file_digest(opts.checkpoint)
    default_positive(ckpt["classes"], opts.positive)  # fail early on a bad --positive or --device
    pick_device(opts.device)
    stages = _Stages(4, opts.progress)
    try:
        with stages("load data"):
            data, cfg = load_eval_data(ckpt, opts.checkpoint, opts)
            split_table, _ = run_split_table(opts.checkpoint, ckpt)
            out = Path(opts.out).expanduser().resolve() if opts.out else default_out(opts.checkpoint, data)
            if out.exists() and not out.is_dir():
                raise CovidxrError(f"--out {out} exists and is not a folder")
        with stages("predict"):
            pred = predict(ckpt, data, cfg)
            if len(pred.y) == 0:
                raise DatasetError(f"no readable image in the evaluated split ({data.split}) of {data.data_path}")
        with stages("metrics"):
            analysis = analyse(ckpt, data, pred, split_table, opts)
            result = assemble(ckpt, data, pred, analysis, split_table, opts, sha, out)
        with stages("report"):
            result["reproducibility"] = reproducibility(opts, ckpt, data, split_table, sha, stages.timings)
            finish(out, result, ckpt, data, pred, analysis, opts)
    finally:
        stages.bar.close()
    result["reproducibility"]["timings_seconds"] = dict(stages.timings)
    result["reproducibility"]["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return {**result, "out": str(out)}


# ------------------------------------------------------------------------------------- reading an evaluation back


def find_eval_dir(path: str | os.PathLike) -> Path:
    """The evaluation folder of a run folder (its ``eval/``), a checkpoint (``eval/`` beside it) or itself.

    Raises:
        CovidxrError: No metrics.json there.
    """
    path = Path(path).expanduser()
    for candidate in (path, path / "eval", path.parent / "eval" if path.is_file() else None):
        if candidate is not None and (candidate / "metrics.json").is_file():
            return candidate.resolve()
    raise CovidxrError(f"{path}: no evaluation found (no metrics.json in it or in its eval/); run "
                       f"python -m covidxr.evaluate --checkpoint RUN/best.pt first")


def latest_evaluated_run(*folders: str | os.PathLike) -> Path | None:
    """The most recently evaluated run folder (one holding ``eval/metrics.json``) below any of ``folders``, or None."""
    found = [m for f in folders if Path(f).is_dir() for m in Path(f).glob("*/eval/metrics.json")]
    return max(found, key=lambda m: m.stat().st_mtime).parent.parent.resolve() if found else None


def load_evaluation(path: str | os.PathLike) -> tuple[dict[str, Any], pd.DataFrame, Path]:
    """Read an evaluation back: ``(metrics.json content, predictions.csv, evaluation folder)``.

    Raises:
        CovidxrError: Missing or unreadable files.
    """
    folder = find_eval_dir(path)
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        predictions = pd.read_csv(folder / "predictions.csv", dtype={"relpath": str, "patient_id": str,
                                                                     "label": str, "predicted": str},
                                  keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CovidxrError(f"{folder}: unreadable evaluation ({str(exc).splitlines()[0]})") from exc
    return metrics, predictions, folder


def headline_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Headline metrics of a metrics.json as a table: estimate, 95% interval, uncalibrated value."""
    ci = (metrics.get("ci") or {}).get("metrics", {})
    rows = []
    for name in (*HEADLINE, "average_precision_macro", "ece", "brier"):
        interval = ci.get(name) or {}
        rows.append({"metric": name, "estimate": metrics["metrics"].get(name), "ci_lo": interval.get("lo"),
                     "ci_hi": interval.get("hi"), "uncalibrated": metrics["metrics_uncalibrated"].get(name)})
    return pd.DataFrame(rows).set_index("metric")


def per_class_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per-class metrics of a metrics.json as a table (one row per class)."""
    return pd.DataFrame(metrics["metrics"]["per_class"]).T


def group_table(groups: dict[str, Any] | None) -> pd.DataFrame:
    """A ``by_source`` / ``by_view`` entry of metrics.json as a table (empty when None)."""
    if not groups:
        return pd.DataFrame()
    keys = ("n", "small", "accuracy", "balanced_accuracy", "roc_auc_macro", "class_counts")
    return pd.DataFrame({g: {k: v.get(k) for k in keys} for g, v in groups.items()}).T


def example_rows(predictions: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """A few images to look at: the most confident errors first, then the most confident correct predictions."""
    classes = [c for c in predictions.columns if f"raw_{c}" in predictions.columns]
    conf = predictions[classes].max(axis=1) if classes else pd.Series(0.0, index=predictions.index)
    wrong = predictions["label"] != predictions["predicted"]
    order = pd.concat([conf[wrong].sort_values(ascending=False), conf[~wrong].sort_values(ascending=False)])
    return predictions.loc[order.index[:n]]


# -------------------------------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.evaluate`` parser."""
    p = OneLineParser(f"python -m {PROG}",
                      description="Evaluate a covidxr checkpoint: metrics with patient-bootstrap intervals, "
                                  "temperature scaling, operating points, breakdowns by source and view, HTML report.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint to evaluate (e.g. RUN/best.pt)")
    p.add_argument("--data", help="dataset folder or manifest (default: the run's training data)")
    p.add_argument("--split", choices=SPLITS, help="split to evaluate (default: test of the run's data; all for an "
                   "external dataset)")
    p.add_argument("--out", type=Path, help="output folder (default: eval/ beside the checkpoint; eval-<dataset>/ "
                   "for an external dataset)")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--positive", help="positive class of the operating points (default: the class named like covid)")
    p.add_argument("--bootstrap", type=int_at_least(0), default=1000, metavar="N",
                   help="patient-level bootstrap resamples for the intervals (0: none; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("-j", "--workers", type=int_at_least(0), default=min(2, os.cpu_count() or 1),
                   help="image decoding and loading processes")
    return p


def _print_summary(result: dict[str, Any]) -> None:
    """Print the headline numbers, the warnings and where the report is."""
    from covidxr.html_page import format_value

    ci = (result["ci"] or {}).get("metrics", {})
    numbers = ", ".join(f"{k} {format_value(ci.get(k) or result['metrics'].get(k))}" for k in HEADLINE)
    print(f"{result['split']} split of {result['data']}: {result['n_images']} images, {result['n_patients']} "
          f"patients; {numbers}; temperature {result['calibration']['temperature']:.3f}")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(f"report: {Path(result['out']) / 'report.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from covidxr.utils import setup_logging

    setup_logging()
    opts = EvalOptions(checkpoint=args.checkpoint, data=args.data, split=args.split, out=args.out,
                       batch_size=args.batch_size, device=args.device, positive=args.positive,
                       bootstrap=args.bootstrap, seed=args.seed, workers=args.workers,
                       command=["python", "-m", PROG, *argv])
    try:
        result = evaluate(opts)
    except CovidxrError as exc:
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    _print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
