"""Reading a saved evaluation back (the app, the notebook and ``covidxr.compare`` use it): metrics.json and
predictions.csv, and tables made from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.errors import CovidxrError, one_line
from covidxr.evaluation.metrics import HEADLINE


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
        raise CovidxrError(f"{folder}: unreadable evaluation ({one_line(exc)})") from exc
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
