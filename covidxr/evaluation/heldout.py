"""Results on data from hospitals the model never saw (an external folder, a source held out of training) in one
shape, and the rows that the report, ``crossval.csv`` and ``crossval.md`` make of them.

A held-out result is ``{"name", "n_images", "n_patients", "class_counts", "metrics", "ci", "baselines"}``: ``metrics``
as :func:`covidxr.evaluation.metrics.classification_metrics` returns them, ``ci`` as
:func:`covidxr.evaluation.bootstrap.bootstrap_ci` (None without resamples), ``baselines`` maps a metadata column to
:func:`covidxr.evaluation.analysis.column_baseline`'s result (or None). Balanced accuracy averages recall over the
classes present; the macro ROC-AUC is one-vs-rest over the classes present and undefined with a single class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from covidxr.evaluation.bootstrap import bootstrap_ci
from covidxr.evaluation.metrics import classification_metrics
from covidxr.html_page import format_value

ABSENT = "—"  # a class with no image in the held-out data: its recall is undefined
ONE_CLASS = "n/a (one class)"
UNSEEN = "n/a (unseen)"  # a baseline on a value training never saw predicts the prior


def heldout_result(name: str, y: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str], classes: Sequence[str],
                   n_resamples: int, seed: int) -> dict[str, Any]:
    """Metrics of one held-out set with patient-bootstrap 95% intervals (``baselines`` left empty for the caller).

    Args:
        name: What the set is (a folder name, a source).
        y: Labels ``(N,)``; probs: ``(N, C)``; patient_ids: ``(N,)``; classes: ``C`` names.
        n_resamples: Bootstrap resamples (0: no intervals).
        seed: Bootstrap seed.
    """
    metrics = classification_metrics(y, probs, classes)
    ci = bootstrap_ci(y, probs, list(patient_ids), classes, n_resamples, seed) if n_resamples else None
    return {"name": name, "n_images": int(len(y)), "n_patients": int(len(set(patient_ids))),
            "class_counts": {c: metrics["per_class"][c]["support"] for c in classes},
            "metrics": metrics, "ci": ci, "baselines": {}}


def present_classes(result: Mapping[str, Any]) -> list[str]:
    """The classes with at least one image in the held-out set, in the model's order."""
    return [c for c, m in result["metrics"]["per_class"].items() if m["support"] > 0]


def _interval(result: Mapping[str, Any], name: str) -> Any:
    """The interval dict of a headline metric, else its point value (no bootstrap)."""
    ci = (result.get("ci") or {}).get("metrics", {})
    return ci.get(name) or result["metrics"].get(name)


def recall_interval(result: Mapping[str, Any], cls: str) -> Any:
    """The recall (sensitivity) of ``cls`` with its interval; None when the class is absent."""
    if result["metrics"]["per_class"][cls]["support"] == 0:
        return None
    ci = (result.get("ci") or {}).get("per_class", {}).get(cls, {}).get("sensitivity")
    return ci or result["metrics"]["per_class"][cls]["recall"]


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The compact headline stored in a checkpoint: balanced accuracy, macro AUC and recall per class present."""
    return {"name": result["name"], "n_images": result["n_images"], "n_patients": result["n_patients"],
            "balanced_accuracy": _interval(result, "balanced_accuracy"),
            "roc_auc_macro": _interval(result, "roc_auc_macro"),
            "recall": {c: recall_interval(result, c) for c in present_classes(result)}}


def _baseline_cell(baseline: Mapping[str, Any] | None, key: str) -> Any:
    if not baseline:
        return None
    if baseline.get("seen_share") == 0:
        return UNSEEN
    return baseline.get(key)


def summary_row(result: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """One table row: sizes, balanced accuracy, macro AUC, recall per class (intervals), baselines beside them."""
    present = present_classes(result)
    auc = _interval(result, "roc_auc_macro") if len(present) > 1 else ONE_CLASS
    row = {"name": result["name"], "n_images": result["n_images"], "n_patients": result["n_patients"],
           "classes": ", ".join(f"{c} {result['class_counts'][c]}" for c in present),
           "balanced_accuracy": _interval(result, "balanced_accuracy"), "roc_auc_macro": auc}
    for c in classes:
        row[f"recall_{c}"] = recall_interval(result, c) if c in present else ABSENT
    baselines = result.get("baselines") or {}
    row["source_only_balanced_accuracy"] = _baseline_cell(baselines.get("source"), "balanced_accuracy")
    row["view_only_balanced_accuracy"] = _baseline_cell(baselines.get("view"), "balanced_accuracy")
    row["view_only_roc_auc_macro"] = _baseline_cell(baselines.get("view"), "roc_auc_macro") if len(present) > 1 \
        else ONE_CLASS
    return row


def summary_columns(classes: Sequence[str], first: str = "held-out data") -> list[tuple[str, str]]:
    """The columns of :func:`summary_row` with their headers."""
    return [("name", first), ("n_images", "images"), ("n_patients", "patients"), ("classes", "per class"),
            ("balanced_accuracy", "balanced acc. (95% CI)"), ("roc_auc_macro", "macro AUC (95% CI)"),
            *[(f"recall_{c}", f"recall {c} (95% CI)") for c in classes],
            ("source_only_balanced_accuracy", "source-only bal. acc."),
            ("view_only_balanced_accuracy", "view-only bal. acc."), ("view_only_roc_auc_macro", "view-only AUC")]


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`summary_row` for a CSV file: each interval split into ``NAME``, ``NAME_lo`` and ``NAME_hi``."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping) and {"estimate", "lo", "hi"} <= set(value):
            out |= {key: value["estimate"], f"{key}_lo": value["lo"], f"{key}_hi": value["hi"]}
        else:
            out[key] = value
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-flavoured Markdown table (values formatted as in the HTML report)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_value(row.get(k)) if row.get(k) is not None else "n/a" for k, _ in columns]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
