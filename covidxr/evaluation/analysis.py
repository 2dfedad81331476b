"""Every number of an evaluation from the logits: calibration, metrics with intervals, operating points, breakdowns
by source and view, metadata-only baselines, and the warnings about what the numbers can and cannot say."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from covidxr.data.confounding import confounding_warnings
from covidxr.errors import DatasetError
from covidxr.evaluation.bootstrap import bootstrap_ci
from covidxr.evaluation.calibration import fit_temperature
from covidxr.evaluation.covid_vs_rest import choose_threshold, internal_sets
from covidxr.evaluation.heldout_calibration import HeldOutLogits
from covidxr.evaluation.inputs import EvalData, EvalOptions
from covidxr.evaluation.logits import SplitOutputs
from covidxr.evaluation.metrics import classification_metrics, group_metrics
from covidxr.evaluation.operating_points import apply_thresholds, operating_points
from covidxr.model.calibration import Calibration, Origin
from covidxr.utils import softmax

TARGET_SENSITIVITIES = (0.90, 0.95)
SOURCE_CONFOUNDED = "this dataset cannot separate disease from source"


def calibrate(pred: SplitOutputs, stored: Calibration, heldout: HeldOutLogits | None = None) -> Calibration:
    """The calibration of this evaluation: fitted on the held-out sources' logits when there are some, else on the
    validation logits, else the model's stored one (external data; its thresholds are kept), else none."""
    if heldout is not None:
        return Calibration.fitted(fit_temperature(heldout.logits, heldout.y), Origin.OUT_OF_SOURCE,
                                  f"fitted out of source, on {heldout.describe()}")
    if pred.val_logits is not None and len(pred.val_y):
        return Calibration.fitted(fit_temperature(pred.val_logits, pred.val_y), Origin.VALIDATION,
                                  f"fitted on the run's validation split ({len(pred.val_y)} images)")
    if stored.origin is not Origin.NONE:
        return replace(stored, origin=Origin.REUSED,
                       how=f"reused from the checkpoint's calibration ({stored.how}); not refitted")
    return Calibration(how="none: no validation split and no temperature in the checkpoint (probabilities "
                           "uncalibrated)")


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


def operating_point_table(pred: SplitOutputs, probs: np.ndarray, val_probs: np.ndarray | None, classes: Sequence[str],
                          positive: str | None, stored: Calibration) -> dict[str, Any] | None:
    """Thresholds for 90%/95% sensitivity of the positive class, chosen on validation and reported on test.

    Args:
        pred: The predictions.
        probs: Calibrated probabilities of the evaluated rows.
        val_probs: Calibrated probabilities of the validation rows, or None (then the model's stored thresholds
            are reused).
        classes: Class names.
        positive: The positive class, or None.
        stored: The model's stored calibration (its thresholds).

    Returns:
        ``{"positive", "score", "chosen_on", "points"}`` or None (no positive class, or nothing to choose on).
    """
    if positive is None:
        return None
    k = list(classes).index(positive)
    score = f"temperature-scaled probability of {positive!r} (positive when >= threshold)"
    if val_probs is not None:
        points = operating_points(pred.val_y == k, val_probs[:, k], pred.y == k, probs[:, k], TARGET_SENSITIVITIES)
        return {"positive": positive, "score": score, "chosen_on": "val", "points": points}
    points_stored = stored.operating_points
    if points_stored.get("positive") != positive or not points_stored.get("points"):
        return None
    points = apply_thresholds(points_stored["points"], pred.y == k, probs[:, k])
    return {"positive": positive, "score": score, "chosen_on": "checkpoint (the run's validation split)",
            "points": points}


def breakdown(pred: SplitOutputs, probs: np.ndarray, classes: Sequence[str], column: str) -> dict[str, Any] | None:
    """``group_metrics`` per value of a manifest column, or None when the column is empty."""
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
        ``{"column", "learned_on", "accuracy", "balanced_accuracy", "roc_auc_macro", "seen_share"}`` or None (no
        such information). ``seen_share`` is the share of evaluated rows whose value occurs in training: at 0 (a
        source never seen, as on external data) the baseline predicts the training prior for every image and says
        nothing.
    """
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
    seen = rows[column].astype(str).isin(table.index)
    return {"column": column, "learned_on": f"run's train split ({len(train)} images)",
            **{k: m[k] for k in ("accuracy", "balanced_accuracy", "roc_auc_macro")},
            "seen_share": float(seen.mean())}


def source_warnings(table: pd.DataFrame) -> list[str]:
    """Confounding of class and source in ``table``, with the plain verdict when it is total.

    A class whose images all come from one source, or a source that gives a single class, makes disease and source
    inseparable: the report says so first. ``covidxr.data.audit.confounding_warnings`` adds the details.

    Args:
        table: Rows with ``label`` and ``source``.

    Returns:
        Warnings (empty when none).
    """
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


def split_warnings(data: EvalData, pred: SplitOutputs, calibration: Calibration) -> list[str]:
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
    if not calibration.origin.fitted:
        out.append(f"temperature {calibration.how}")
    if data.run.unreadable:
        out.append(f"{len(data.run.unreadable)} unreadable image(s) skipped (listed in metrics.json 'unreadable')")
    if pred.table["patient_id"].astype(str).str.startswith("image:").all():
        out.append("no patient ids: every image is treated as its own patient in the bootstrap (intervals are too "
                   "narrow if patients have several images)")
    return out


def covid_block(pred: SplitOutputs, probs: np.ndarray, val_probs: np.ndarray | None, classes: Sequence[str],
                positive: str | None, stored_calibration: Calibration, heldout: HeldOutLogits | None,
                temperature: float, opts: EvalOptions, split: str) -> dict[str, Any] | None:
    """COVID-vs-rest with its threshold fixed before testing: on the held-out sources when there are some, else on
    validation, else the stored one (:mod:`covidxr.evaluation.covid_vs_rest`)."""
    if positive is None:
        return None
    k = list(classes).index(positive)
    stored = stored_calibration.covid_vs_rest
    if heldout is not None:
        threshold, chosen_on = choose_threshold(heldout.y == k, softmax(heldout.logits, temperature)[:, k], stored,
                                                heldout.describe())
    elif val_probs is not None:
        threshold, chosen_on = choose_threshold(pred.val_y == k, val_probs[:, k], stored,
                                                f"the run's validation split ({len(pred.val_y)} films)")
    else:
        threshold, chosen_on = choose_threshold(None, None, stored, "")
    sets = internal_sets(pred.table, pred.y, probs, classes, positive, threshold, opts.bootstrap, opts.seed, split)
    return {"positive": positive, "threshold": threshold, "chosen_on": chosen_on, "sets": sets}


def analyse(classes: Sequence[str], stored: Calibration, data: EvalData, pred: SplitOutputs,
            split_table: pd.DataFrame | None, opts: EvalOptions,
            heldout: HeldOutLogits | None = None) -> dict[str, Any]:
    """Compute every number of the evaluation from the logits (calibrated out of source when ``heldout`` is given;
    ``stored`` is the model's calibration, reused where nothing is fitted).

    Returns:
        The analysis part of metrics.json plus ``_probs``, ``_raw`` (probability arrays) and ``_calibration`` (the
        :class:`~covidxr.model.calibration.Calibration` used), which are not serialised.
    """
    classes = list(classes)
    calibrated = calibrate(pred, stored, heldout)
    temperature, how = calibrated.temperature, calibrated.how
    raw, probs = softmax(pred.logits), softmax(pred.logits, temperature)
    val_probs = softmax(pred.val_logits, temperature) if pred.val_logits is not None else None
    metrics = classification_metrics(pred.y, probs, classes)
    uncal = classification_metrics(pred.y, raw, classes)
    groups = pred.table["patient_id"].astype(str).tolist()
    ci = bootstrap_ci(pred.y, probs, groups, classes, opts.bootstrap, opts.seed) if opts.bootstrap else None
    train = split_table[split_table["split"] == "train"] if split_table is not None else None
    calibration = {"temperature": temperature, "how": how, "origin": calibrated.origin.value,
                   "ece_before": uncal["ece"], "ece_after": metrics["ece"],
                   "brier_before": uncal["brier"], "brier_after": metrics["brier"], "n_bins": 15,
                   "measured_on": data.split}
    return {
        "metrics": metrics, "metrics_uncalibrated": uncal, "ci": ci, "calibration": calibration,
        "operating_points": operating_point_table(pred, probs, val_probs, classes,
                                                  default_positive(classes, opts.positive), stored),
        "covid_vs_rest": covid_block(pred, probs, val_probs, classes, default_positive(classes, opts.positive), stored,
                                     heldout, temperature, opts, data.split),
        "by_source": breakdown(pred, probs, classes, "source"), "by_view": breakdown(pred, probs, classes, "view"),
        "baselines": {c: column_baseline(train, pred.table, pred.y, classes, c) for c in ("source", "view")},
        "_probs": probs, "_raw": raw, "_calibration": calibrated,
    }
