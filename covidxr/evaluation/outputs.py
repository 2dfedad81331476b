"""What an evaluation writes besides report.html: predictions.csv, the PNG plots, the checkpoint's summary and the
reproducibility record; and the JSON-safe conversion of metrics.json."""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxr import __version__
from covidxr.evaluation import heldout, plots
from covidxr.evaluation.inputs import EvalData, EvalOptions
from covidxr.evaluation.logits import SplitOutputs
from covidxr.evaluation.metrics import HEADLINE
from covidxr.files import atomic_write_bytes, file_digest, text_digest
from covidxr.model.trained import TrainedModel
from covidxr.networks.tta import VIEWS
from covidxr.utils import library_versions

log = logging.getLogger("covidxr.evaluate")

META_COLUMNS = ("path", "relpath", "patient_id", "source", "view", "split")
PLOT_FILES = {
    "confusion_counts": "confusion_counts.png",
    "confusion_normalized": "confusion_normalized.png",
    "roc": "roc.png",
    "pr": "pr.png",
    "reliability": "reliability.png",
    "history": "history.png",
    "decision_curve": "decision_curve.png",  # drawn by covidxr.evaluation.publication
}
EXPLAIN_SUMMARY = "explain_summary.csv"


def jsonable(value: Any) -> Any:
    """Convert numpy scalars and NaN/inf to JSON-safe values, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


def predictions_frame(pred: SplitOutputs, probs: np.ndarray, raw: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
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


def load_history(model: TrainedModel) -> pd.DataFrame | None:
    """The training history: ``history.csv`` beside the checkpoint, else the checkpoint's, else None."""
    path = model.path.parent / "history.csv"
    if path.is_file():
        try:
            history = pd.read_csv(path)
            return history if not history.empty else None
        except (OSError, ValueError, pd.errors.ParserError):
            log.warning("cannot read %s; using the checkpoint's history", path)
    rows = model.record.get("history") or []
    return pd.DataFrame(rows) if rows else None


def make_plots(out: Path, pred: SplitOutputs, probs: np.ndarray, raw: np.ndarray, classes: Sequence[str],
               cm: list[list[int]], history: pd.DataFrame | None) -> dict[str, tuple[str, bytes]]:
    """Render and save the PNG plots.

    Returns:
        ``{name: (file name, PNG bytes)}``.
    """
    figures: dict[str, Callable[[], Any]] = {
        "confusion_counts": lambda: plots.plot_confusion_matrix(cm, classes, normalize=False),
        "confusion_normalized": lambda: plots.plot_confusion_matrix(cm, classes, normalize=True),
        "roc": lambda: plots.plot_roc_curves(pred.y, probs, classes),
        "pr": lambda: plots.plot_pr_curves(pred.y, probs, classes),
        "reliability": lambda: plots.plot_reliability(pred.y, raw, probs),
    }
    if history is not None:
        figures["history"] = lambda: plots.plot_history(history)
    rendered = {}
    for name, make in figures.items():
        png = plots.figure_png(make())
        atomic_write_bytes(out / PLOT_FILES[name], png)  # world-readable like the other outputs (0644)
        rendered[name] = (PLOT_FILES[name], png)
    return rendered


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
    return jsonable(frame.astype(object).where(frame.notna(), None).to_dict("records"))


def default_out(checkpoint: Path, data: EvalData, tta: bool = False, site: str | None = None) -> Path:
    """``eval/`` beside the checkpoint for the run's data, ``eval-<dataset>/`` for an external dataset; with
    test-time augmentation ``eval-tta/`` and ``eval-<dataset>-tta/``; adapted to a site
    ``eval-<dataset>-site-NAME/``."""
    suffix = ("-tta" if tta else "") + (f"-site-{_slug(site)}" if site else "")
    if data.own:
        return checkpoint.parent / f"eval{suffix}"
    path = data.data_path
    name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
    return checkpoint.parent / f"eval-{_slug(name)}{suffix}"


def _slug(text: str) -> str:
    """A file-name-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def evaluation_summary(result: dict[str, Any], checkpoint: Path, out: Path) -> dict[str, Any]:
    """The compact summary stored in the checkpoint (``ckpt["evaluation"]``) and in metrics.json (``summary``)."""
    metrics = result["metrics"]
    base = checkpoint.parent
    return jsonable({
        "split": result["split"], "n_images": result["n_images"], "n_patients": result["n_patients"],
        "dataset": result["model_card"]["data"]["evaluated"]["dataset"],
        "metrics": {**{k: metrics[k] for k in (*HEADLINE, "average_precision_macro", "ece", "brier")},
                    "per_class": metrics["per_class"]},
        "ci": result["ci"], "calibration": result["calibration"], "operating_points": result["operating_points"],
        "covid_vs_rest": ({k: result["covid_vs_rest"][k] for k in ("positive", "threshold", "chosen_on")}
                          if result.get("covid_vs_rest") else None),
        "external": [heldout.headline(e) for e in result.get("external") or []],
        "report": os.path.relpath(out / "report.html", base),
        "metrics_json": os.path.relpath(out / "metrics.json", base),
        "checkpoint_sha256": result["checkpoint_sha256"], "created": result["reproducibility"]["created"],
    })


def reproducibility(opts: EvalOptions, model: TrainedModel, data: EvalData, split_table: pd.DataFrame | None,
                    timings: dict[str, float]) -> dict[str, Any]:
    """The record that lets someone repeat this evaluation."""
    split_csv = opts.checkpoint.parent / "split.csv"
    if split_csv.is_file():
        split_sha, split_from = file_digest(split_csv), str(split_csv)
    elif split_table is not None:
        split_sha, split_from = text_digest(split_table.to_csv(index=False)), "checkpoint (as CSV)"
    else:
        split_sha, split_from = None, None
    git = git_state()
    return jsonable({
        "covidxr_version": __version__, "git_commit": git["commit"], "git_dirty": git["dirty"],
        "command": list(opts.command or sys.argv), "command_line": shlex.join(opts.command or sys.argv),
        "argv": list(sys.argv),
        "config": model.record.get("config"), "data": str(data.data_path),
        **data.manifest,
        "split_table_sha256": split_sha, "split_table": split_from, "checkpoint": str(opts.checkpoint),
        "checkpoint_sha256": model.sha256, "library_versions": library_versions(),
        "seeds": {"bootstrap": opts.seed, "training": model.config.get("seed")},
        "bootstrap": {"n_resamples": opts.bootstrap, "seed": opts.seed, "unit": "patient", "alpha": 0.05},
        "test_time_augmentation": {"views": [list(v) for v in VIEWS]} if opts.tta else None,
        "device": opts.device, "batch_size": opts.batch_size, "workers": opts.workers,
        "timings_seconds": dict(timings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
