"""Patient-level bootstrap: confidence intervals of the headline metrics and the paired test of two models' AUC.

Patients (not images) are drawn with replacement, because images of one patient are correlated. The inner loop is
vectorised over resamples (confusion matrices, rank-based AUC) instead of calling scikit-learn per resample, where
its per-call overhead would dominate; the tests check that these formulas agree with scikit-learn on the full data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from covidxr.evaluation.arrays import auc_classes, check_inputs, clean, group_codes, macro_auc
from covidxr.evaluation.metrics import HEADLINE


def _cm_headline(cm: np.ndarray) -> dict[str, Any]:
    """Headline label metrics from confusion matrices, vectorised over a leading batch axis.

    Mirrors scikit-learn: balanced accuracy is the mean recall over classes present in ``y_true``; macro F1 uses
    ``zero_division=nan`` semantics (a class with TP+FP+FN = 0 is left out of the mean). ``cm`` is ``(B, C, C)``
    (rows = true class, columns = predicted class); the result holds arrays of shape ``(B,)`` (``accuracy``,
    ``balanced_accuracy``, ``f1_macro``) and ``(B, C)`` (``sensitivity``, ``specificity``), NaN where undefined.
    """
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fn = support - tp
    fp = predicted - tp
    tn = n[:, None] - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = np.where(support > 0, tp / support, np.nan)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        f1_den = 2 * tp + fp + fn
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, np.nan)
        accuracy = tp.sum(axis=1) / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        balanced = np.nanmean(sensitivity, axis=1)
        f1_macro = np.nanmean(f1, axis=1)
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "f1_macro": f1_macro,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def _patient_rows(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows sorted by patient, rows per patient, first sorted row of each patient)`` of ``groups`` (any ids)."""
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes)
    return np.argsort(codes, kind="stable"), counts, np.concatenate(([0], np.cumsum(counts)[:-1]))


def _resample_indices(groups: np.ndarray, rng: np.random.Generator,
                      rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Row indices of one patient-level bootstrap resample.

    Draws ``G`` patients with replacement from the ``G`` distinct ids and returns the rows of every drawn patient,
    concatenated in draw order; a patient drawn ``k`` times contributes each of its rows ``k`` times. ``groups``
    are codes from ``group_codes`` or any ids; the number of rows returned varies with the patients drawn. ``rows``
    is :func:`_patient_rows` of ``groups`` when the caller has it already (the same draw either way).
    """
    order, counts, starts = rows if rows is not None else _patient_rows(groups)
    drawn = rng.integers(0, counts.size, size=counts.size)
    lengths = counts[drawn]
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[drawn], lengths) + offsets]


def percentile_interval(samples: np.ndarray, estimate: float, alpha: float) -> dict[str, Any]:
    """``{"estimate", "lo", "hi", "n_valid", "n_skipped"}``: the percentile interval of the bootstrap ``samples``,
    skipping undefined (NaN) resamples; ``lo``/``hi`` are ``None`` without valid resamples."""
    valid = samples[np.isfinite(samples)]
    if valid.size:
        lo, hi = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    else:
        lo = hi = None
    return {
        "estimate": clean(estimate),
        "lo": clean(lo),
        "hi": clean(hi),
        "n_valid": int(valid.size),
        "n_skipped": int(samples.size - valid.size),
    }


def bootstrap_draws(groups: Any, n: int, n_resamples: int, seed: int) -> tuple[list[np.ndarray], int]:
    """``(n_resamples patient-level resamples as row-index arrays, number of distinct patients)``."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    codes = group_codes(groups, n)
    rng = np.random.default_rng(seed)
    rows = _patient_rows(codes)  # once, not per resample
    return [_resample_indices(codes, rng, rows) for _ in range(n_resamples)], int(codes.max()) + 1


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Any],
    classes: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Patient-level percentile bootstrap confidence intervals of the headline metrics.

    Patients (not images) are drawn with replacement, because images of one patient are correlated; resampling
    images would give intervals that are too narrow. A resample where a metric is undefined is skipped for that
    metric: for the macro metrics (``balanced_accuracy``, ``f1_macro``, ``roc_auc_macro``) that is any resample
    missing a class that the full data has (so every resample estimates the same quantity); for a class's
    sensitivity, a resample without that class; for its specificity, a resample with only that class.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        groups: Patient ids, shape ``(N,)``.
        classes: ``C`` class names.
        n_resamples: Number of bootstrap resamples.
        seed: Seed of ``numpy.random.default_rng``; same seed, same intervals.
        alpha: ``1 - confidence level`` (0.05 gives 95% intervals from the 2.5th and 97.5th percentiles).

    Returns:
        ``{"metrics": {name: CI}, "per_class": {class: {"sensitivity": CI, "specificity": CI}}, "n_resamples",
        "seed", "alpha", "n_groups", "n", "method"}`` with ``name`` in ``accuracy``, ``balanced_accuracy``,
        ``f1_macro``, ``roc_auc_macro`` and each ``CI = {"estimate", "lo", "hi", "n_valid", "n_skipped"}``
        (``estimate`` is the value on the full data; ``n_valid + n_skipped = n_resamples``). ``estimate``,
        ``lo``, ``hi`` are ``None`` when undefined. ``roc_auc_macro`` averages over the classes that have positives
        and negatives in the full data (as ``classification_metrics`` does).
    """
    classes = list(classes)
    y, p = check_inputs(y_true, probs, len(classes))
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    n_classes = len(classes)
    draws, n_groups = bootstrap_draws(groups, y.size, n_resamples, seed)
    pred = p.argmax(axis=1)
    cell = y * n_classes + pred
    present = np.bincount(y, minlength=n_classes) > 0
    auc_idx = auc_classes(y, n_classes)

    full = _cm_headline(np.bincount(cell, minlength=n_classes**2).reshape(1, n_classes, n_classes))
    full_auc = macro_auc(y, p, auc_idx)

    cms = np.stack([np.bincount(cell[idx], minlength=n_classes**2) for idx in draws]).reshape(-1, n_classes, n_classes)
    boot = _cm_headline(cms)
    complete = np.all(cms.sum(axis=2)[:, present] > 0, axis=1)  # every class of the full data still present
    boot_auc = np.array(
        [macro_auc(y[idx], p[idx], auc_idx) if ok else np.nan for idx, ok in zip(draws, complete, strict=True)]
    )
    boot["balanced_accuracy"] = np.where(complete, boot["balanced_accuracy"], np.nan)
    boot["f1_macro"] = np.where(complete, boot["f1_macro"], np.nan)

    metrics = {name: percentile_interval(boot[name], full[name][0], alpha) for name in HEADLINE[:3]}
    metrics["roc_auc_macro"] = percentile_interval(boot_auc, full_auc, alpha)
    per_class = {
        name: {
            "sensitivity": percentile_interval(boot["sensitivity"][:, k], full["sensitivity"][0, k], alpha),
            "specificity": percentile_interval(boot["specificity"][:, k], full["specificity"][0, k], alpha),
        }
        for k, name in enumerate(classes)
    }
    return {
        "metrics": metrics,
        "per_class": per_class,
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "alpha": float(alpha),
        "n_groups": n_groups,
        "n": int(y.size),
        "method": "percentile bootstrap over patients (all images of a drawn patient move together)",
    }


def paired_bootstrap_auc(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Compare two models' macro one-vs-rest ROC-AUC with a paired, patient-level bootstrap.

    Both models are scored on the same resampled patients in every resample, so the test accounts for their
    correlation. The macro AUC averages over the classes that have positives and negatives in the full data;
    resamples missing one of those classes are skipped.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs_a: Probabilities of model A, shape ``(N, C)``.
        probs_b: Probabilities of model B, shape ``(N, C)``, same rows as ``probs_a``.
        groups: Patient ids, shape ``(N,)``.
        n_resamples: Number of bootstrap resamples.
        seed: Seed of ``numpy.random.default_rng``.
        alpha: ``1 - confidence level`` of the interval of the difference.

    Returns:
        ``{"auc_a", "auc_b", "diff", "lo", "hi", "p_value", "significant", "n_valid", "n_resamples", "seed",
        "n_groups", "alpha"}`` where ``diff = auc_a - auc_b`` on the full data, ``[lo, hi]`` is the percentile
        interval of the bootstrap differences, ``p_value`` is the two-sided bootstrap p-value
        ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` with the add-one correction ``(count + 1) / (n_valid + 1)``,
        and ``significant`` is ``True`` when the interval excludes 0. Values are ``None`` when undefined (e.g.
        fewer than two classes have positives and negatives, or no valid resample).
    """
    y, pa = check_inputs(y_true, probs_a)
    _, pb = check_inputs(y_true, probs_b, pa.shape[1])
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    n_classes = pa.shape[1]
    draws, n_groups = bootstrap_draws(groups, y.size, n_resamples, seed)
    auc_idx = auc_classes(y, n_classes)
    auc_a = macro_auc(y, pa, auc_idx)
    auc_b = macro_auc(y, pb, auc_idx)
    diffs = np.full(n_resamples, np.nan)
    for i, idx in enumerate(draws):  # macro_auc is NaN when a class of auc_idx lacks positives or negatives
        diffs[i] = macro_auc(y[idx], pa[idx], auc_idx) - macro_auc(y[idx], pb[idx], auc_idx)
    valid = diffs[np.isfinite(diffs)]
    lo = hi = p_value = None
    significant = None
    if valid.size and auc_idx:
        lo_f, hi_f = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
        lo, hi = float(lo_f), float(hi_f)
        n_le = int(np.sum(valid <= 0))
        n_ge = int(np.sum(valid >= 0))
        p_value = float(min(1.0, 2.0 * min(n_le + 1, n_ge + 1) / (valid.size + 1)))
        significant = bool(lo > 0 or hi < 0)
    return {
        "auc_a": clean(auc_a),
        "auc_b": clean(auc_b),
        "diff": clean(auc_a - auc_b),
        "lo": lo,
        "hi": hi,
        "p_value": p_value,
        "significant": significant,
        "n_valid": int(valid.size),
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "n_groups": n_groups,
        "alpha": float(alpha),
    }
