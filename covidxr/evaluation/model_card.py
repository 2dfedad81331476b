"""The model card: data, intended use, limitations, architecture and training, headline metrics."""

from __future__ import annotations

from typing import Any

import pandas as pd

from covidxr.data.run_folder import training_data
from covidxr.evaluation.analysis import source_warnings
from covidxr.evaluation.inputs import EvalData
from covidxr.evaluation.metrics import HEADLINE
from covidxr.evaluation.outputs import jsonable
from covidxr.model.trained import TrainedModel

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


def model_card(trained: TrainedModel, data: EvalData, evaluated: pd.DataFrame, split_table: pd.DataFrame | None,
               metrics: dict[str, Any], ci: dict[str, Any] | None) -> dict[str, Any]:
    """The model card: data, intended use, limitations, architecture and training, headline metrics.

    Args:
        trained: The trained model.
        data: The evaluation data.
        evaluated: The evaluated rows.
        split_table: The run's split (counts of the training data), or None.
        metrics: Calibrated metrics of the evaluated split.
        ci: Bootstrap intervals, or None.

    Returns:
        A JSON-safe dict.
    """
    cfg, record = trained.config, trained.record
    run_rows = split_table if split_table is not None else pd.DataFrame(columns=["label", "split", "patient_id"])
    card_data: dict[str, Any] = {
        "training_data": training_data(record),
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
    model = {"arch": trained.arch, "classes": list(trained.classes),
             "img_size": record["preprocess"].get("img_size"),
             "preprocess": dict(record["preprocess"]), "epochs_trained": record.get("epoch"),
             "best_epoch": record.get("best_epoch"), "best_val_macro_auc": record.get("best_auc"),
             "training": {k: cfg.get(k) for k in keys if k in cfg}, "created": record.get("created")}
    headline = {k: (ci["metrics"][k] if ci else metrics.get(k)) for k in HEADLINE}
    return jsonable({"data": card_data, "intended_use": INTENDED_USE, "limitations": list(LIMITATIONS),
                      "model": model, "headline": headline})


def _crosstab(table: pd.DataFrame, rows: str, cols: str) -> dict[str, dict[str, int]]:
    """Counts of ``rows`` x ``cols`` as a nested dict (empty when a column is missing or blank)."""
    if table.empty or rows not in table.columns or cols not in table.columns:
        return {}
    values = table[cols].fillna("").astype(str).replace("", "(unknown)")
    counts = pd.crosstab(table[rows].astype(str), values)
    return {str(r): {str(c): int(v) for c, v in row.items() if v} for r, row in counts.iterrows()}
