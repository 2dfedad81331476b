"""Reading a saved evaluation back (the report, the app, the notebook and ``covidxr.compare`` use it): metrics.json as
its typed record (:mod:`covidxr.evaluation.records`, re-exported here for the app) and predictions.csv, and tables
made from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.errors import CovidxrError, one_line
from covidxr.evaluation.metrics import HEADLINE
from covidxr.evaluation.records import (
    CalibrationResult,
    CovidSet,
    EvaluationRecord,
    ExternalSet,
    GroupMetrics,
    Interval,
    MetricsShapeError,
    ThresholdRow,
    read_record,
    record_json,
    upgrade,
)

__all__ = ["CalibrationResult", "CovidSet", "EvaluationRecord", "ExternalSet", "GroupMetrics", "Interval",
           "MetricsShapeError", "ThresholdRow", "example_rows", "find_eval_dir", "group_table", "headline_table",
           "latest_evaluated_run", "load_evaluation", "per_class_rows", "per_class_table", "read_metrics",
           "read_record", "record_json", "upgrade"]


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


def read_metrics(path: str | os.PathLike) -> EvaluationRecord:
    """The record of one metrics.json file.

    Raises:
        CovidxrError: Missing or unreadable file, or a shape this version cannot read (one line).
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CovidxrError(f"{path}: unreadable evaluation ({one_line(exc)})") from exc
    return read_record(content, str(path))


def load_evaluation(path: str | os.PathLike) -> tuple[EvaluationRecord, pd.DataFrame, Path]:
    """Read an evaluation back: ``(metrics.json's record, predictions.csv, evaluation folder)``.

    Raises:
        CovidxrError: Missing or unreadable files, or a metrics.json this version cannot read.
    """
    folder = find_eval_dir(path)
    metrics = read_metrics(folder / "metrics.json")
    try:
        predictions = pd.read_csv(folder / "predictions.csv", dtype={"relpath": str, "patient_id": str,
                                                                     "label": str, "predicted": str},
                                  keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CovidxrError(f"{folder}: unreadable evaluation ({one_line(exc)})") from exc
    return metrics, predictions, folder


def headline_table(record: EvaluationRecord) -> pd.DataFrame:
    """Headline metrics of an evaluation as a table: estimate, 95% interval, uncalibrated value."""
    ci = record.ci.metrics if record.ci else {}
    uncalibrated = record.metrics_uncalibrated
    rows = []
    for name in (*HEADLINE, "average_precision_macro", "ece", "brier"):
        interval = ci.get(name) or Interval()
        rows.append({"metric": name, "estimate": getattr(record.metrics, name), "ci_lo": interval.lo,
                     "ci_hi": interval.hi, "uncalibrated": getattr(uncalibrated, name) if uncalibrated else None})
    return pd.DataFrame(rows).set_index("metric")


def per_class_rows(test_set: EvaluationRecord | ExternalSet) -> list[dict[str, Any]]:
    """One row per class of an evaluated set: ``class``, ``support`` (images), ``n_predicted`` (images the model gave
    the class), ``sensitivity`` and ``specificity`` (each its bootstrap :class:`Interval` where saved, else the point
    estimate), ``precision`` (PPV), ``npv``, ``f1``, ``roc_auc`` and ``average_precision``. The one reading of the
    per-class figures: the report, the app and :func:`per_class_table` show these rows."""
    metrics = test_set.metrics or EvaluationRecord().metrics
    ci = test_set.ci.per_class if test_set.ci else {}
    rows = []
    for name, m in metrics.per_class.items():
        intervals = ci.get(name) or {}
        rows.append({"class": name, "support": m.support, "n_predicted": m.n_predicted,
                     "sensitivity": intervals.get("sensitivity") or m.recall,
                     "specificity": intervals.get("specificity") or m.specificity,
                     "precision": m.precision, "npv": m.npv, "f1": m.f1, "roc_auc": m.roc_auc,
                     "average_precision": m.average_precision})
    return rows


def per_class_table(test_set: EvaluationRecord | ExternalSet) -> pd.DataFrame:
    """:func:`per_class_rows` as a table indexed by class."""
    return pd.DataFrame(per_class_rows(test_set)).set_index("class") if test_set.metrics and \
        test_set.metrics.per_class else pd.DataFrame()


def group_table(groups: dict[str, GroupMetrics] | None) -> pd.DataFrame:
    """A ``by_source`` / ``by_view`` entry of an evaluation as a table (empty when None)."""
    if not groups:
        return pd.DataFrame()
    keys = ("n", "small", "accuracy", "balanced_accuracy", "roc_auc_macro", "class_counts")
    return pd.DataFrame({g: {k: getattr(v, k) for k in keys} for g, v in groups.items()}).T


def example_rows(predictions: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """A few images to look at: the most confident errors first, then the most confident correct predictions."""
    classes = [c for c in predictions.columns if f"raw_{c}" in predictions.columns]
    conf = predictions[classes].max(axis=1) if classes else pd.Series(0.0, index=predictions.index)
    wrong = predictions["label"] != predictions["predicted"]
    order = pd.concat([conf[wrong].sort_values(ascending=False), conf[~wrong].sort_values(ascending=False)])
    return predictions.loc[order.index[:n]]
