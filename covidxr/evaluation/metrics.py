"""Point metrics of multi-class chest X-ray classifiers: on a whole split and per group (source, view, ...).

Every public function takes numpy arrays and returns plain Python values (``dict``, ``list``, ``float``, ``int``,
``str``, ``None``) that ``json.dumps`` accepts. An undefined value (e.g. the ROC-AUC of a class with no positives) is
reported as ``None``, never as NaN.

The conventions for ``y_true``, ``probs``, ``classes`` and ``groups`` are in :mod:`covidxr.evaluation.arrays`;
calibration is in :mod:`covidxr.evaluation.calibration`, the patient bootstrap in :mod:`covidxr.evaluation.bootstrap`
and thresholds in :mod:`covidxr.evaluation.operating_points`.

scikit-learn computes every metric it provides; only specificity, NPV and calibration error (which it lacks) and the
inner loop of the bootstrap (where per-call overhead would dominate) are computed here, and the tests check that the
bootstrap's vectorised formulas agree with scikit-learn on the full data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from covidxr.evaluation.arrays import auc_classes, check_inputs, clean
from covidxr.evaluation.calibration import expected_calibration_error

# The headline metrics of a report, a model card and a comparison.
HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """All point metrics of a multi-class classifier on one split.

    Conventions for undefined values (reported as ``None``):

    * ``precision`` (PPV) of a class that is never predicted, ``recall`` of a class absent from ``y_true``,
      ``specificity`` of a class when every sample belongs to it, ``npv`` of a class predicted for every sample,
      ``f1`` of a class that is both absent and never predicted (scikit-learn ``zero_division=nan``).
      A class that is present but never predicted has ``recall = 0`` and ``f1 = 0`` (well defined).
    * ``f1_macro`` averages the defined per-class F1 values (so an absent, never-predicted class is left out);
      ``balanced_accuracy`` averages recall over the classes present in ``y_true`` (scikit-learn's definition).
    * ``roc_auc`` / ``average_precision`` of a class without positives (or without negatives) are ``None``; the
      macro averages are taken over the remaining classes, listed by name in ``macro_excluded_classes``.
    * ``cohen_kappa`` is ``None`` when undefined (e.g. a single label everywhere).

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        classes: ``C`` class names.

    Returns:
        ``{"n", "classes", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "cohen_kappa", "mcc",
        "roc_auc_macro", "average_precision_macro", "macro_excluded_classes", "brier", "log_loss", "ece",
        "confusion_matrix", "per_class"}`` where ``confusion_matrix`` is a list of ``C`` lists (rows = true class,
        columns = predicted class, order = ``classes``) and ``per_class`` maps each class name to
        ``{"precision", "recall", "specificity", "npv", "f1", "support", "n_predicted", "roc_auc",
        "average_precision"}``.
    """
    classes = list(classes)
    y, p = check_inputs(y_true, probs, len(classes))
    n_classes = len(classes)
    labels = list(range(n_classes))
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y, pred, labels=labels, zero_division=np.nan
        )
        f1_macro = skm.f1_score(y, pred, labels=labels, average="macro", zero_division=np.nan)
        f1_weighted = skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=np.nan)
        balanced = skm.balanced_accuracy_score(y, pred)
        kappa = skm.cohen_kappa_score(y, pred, labels=labels)
        mcc = skm.matthews_corrcoef(y, pred)
    cm = skm.confusion_matrix(y, pred, labels=labels)
    mcm = skm.multilabel_confusion_matrix(y, pred, labels=labels)  # (C, 2, 2): [[tn, fp], [fn, tp]]
    auc_idx = auc_classes(y, n_classes)
    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    aps: list[float] = []
    for k, name in enumerate(classes):
        (tn, fp), (fn, _tp) = mcm[k]
        auc = ap = None
        if k in auc_idx:
            auc = float(skm.roc_auc_score(y == k, p[:, k]))
            ap = float(skm.average_precision_score(y == k, p[:, k]))
            aucs.append(auc)
            aps.append(ap)
        per_class[name] = {
            "precision": clean(precision[k]),
            "recall": clean(recall[k]),
            "specificity": clean(tn / (tn + fp)) if tn + fp else None,
            "npv": clean(tn / (tn + fn)) if tn + fn else None,
            "f1": clean(f1[k]),
            "support": int(support[k]),
            "n_predicted": int(cm[:, k].sum()),
            "roc_auc": auc,
            "average_precision": ap,
        }
    return {
        "n": int(y.size),
        "classes": classes,
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": clean(balanced),
        "f1_macro": clean(f1_macro),
        "f1_weighted": clean(f1_weighted),
        "cohen_kappa": clean(kappa),
        "mcc": clean(mcc),
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "average_precision_macro": float(np.mean(aps)) if aps else None,
        "macro_excluded_classes": [classes[k] for k in labels if k not in auc_idx],
        "brier": float(skm.brier_score_loss(y, p, labels=labels, scale_by_half=False)),
        "log_loss": float(skm.log_loss(y, np.clip(p, 1e-15, 1.0), labels=labels)),
        "ece": expected_calibration_error(y, p),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
    }


def group_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    group_values: Sequence[Any],
    min_n: int = 30,
) -> dict[str, dict[str, Any]]:
    """Headline metrics per value of a categorical column (data source, view position, sex, ...).

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        classes: ``C`` class names.
        group_values: One value per sample; ``None``/NaN become the group ``"(missing)"``, other values ``str()``.
        min_n: Groups with fewer samples are flagged ``"small": True`` (still reported).

    Returns:
        ``{value: {"n", "small", "class_counts", "accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro",
        "macro_excluded_classes", "per_class"}}`` sorted by value, where ``class_counts`` maps class name to its
        number of samples in the group and ``per_class`` maps class name to ``{"sensitivity", "specificity",
        "support"}`` (values as in ``classification_metrics``: ``None`` when undefined).
    """
    classes = list(classes)
    y, p = check_inputs(y_true, probs, len(classes))
    values = np.asarray(group_values, dtype=object)
    if values.shape != (y.size,):
        raise ValueError(f"group_values must have shape ({y.size},), got {values.shape}")
    keys = np.array(
        ["(missing)" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values],
        dtype=object,
    )
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(set(keys.tolist())):
        mask = keys == key
        m = classification_metrics(y[mask], p[mask], classes)
        out[key] = {
            "n": m["n"],
            "small": m["n"] < min_n,
            "class_counts": {c: m["per_class"][c]["support"] for c in classes},
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "f1_macro": m["f1_macro"],
            "roc_auc_macro": m["roc_auc_macro"],
            "macro_excluded_classes": m["macro_excluded_classes"],
            "per_class": {
                c: {
                    "sensitivity": m["per_class"][c]["recall"],
                    "specificity": m["per_class"][c]["specificity"],
                    "support": m["per_class"][c]["support"],
                }
                for c in classes
            },
        }
    return out
