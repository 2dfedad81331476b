"""Evaluation metrics for multi-class chest X-ray classifiers.

Every public function takes numpy arrays and returns plain Python values (``dict``, ``list``, ``float``, ``int``,
``str``, ``None``) that ``json.dumps`` accepts. An undefined value (e.g. the ROC-AUC of a class with no positives) is
reported as ``None``, never as NaN.

Conventions shared by all functions:

* ``y_true``: shape ``(N,)``, integer class indices in ``[0, C)``.
* ``probs``: shape ``(N, C)``, class probabilities (rows sum to 1). The predicted class is ``argmax(probs, axis=1)``
  (ties go to the lowest index).
* ``classes``: ``C`` class names, index-aligned with the columns of ``probs``.
* ``groups``: shape ``(N,)``, patient ids. Bootstrap procedures resample *patients*, so every image of a drawn patient
  enters the resample together (a patient drawn twice contributes all its images twice).

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
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import rankdata
from sklearn import metrics as skm

__all__ = [
    "bootstrap_ci",
    "classification_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "group_metrics",
    "operating_points",
    "paired_bootstrap_auc",
    "reliability_bins",
]

_HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro")


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def _clean(value: Any) -> float | None:
    """Convert a numeric value to a JSON-safe float.

    Args:
        value: A Python or numpy number, or ``None``.

    Returns:
        ``None`` for ``None``/NaN/inf, otherwise ``float(value)``.
    """
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _check_inputs(y_true: Any, probs: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels and probabilities.

    Args:
        y_true: Integer class indices, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        n_classes: Expected ``C`` (e.g. ``len(classes)``), or ``None`` to skip that check.

    Returns:
        ``(y_true as int64 array, probs as float64 array)``.

    Raises:
        ValueError: On empty input, wrong shapes, non-finite probabilities or labels outside ``[0, C)``.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N={y.shape[0]}, got {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but {n_classes} classes were given")
    if p.shape[1] < 2:
        raise ValueError("at least two classes are needed")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return y, p


def _group_codes(groups: Any, n: int) -> np.ndarray:
    """Map patient ids to integer codes ``0..G-1``.

    Args:
        groups: Patient ids, shape ``(N,)``; any hashable values except ``None``/NaN.
        n: Expected length ``N``.

    Returns:
        int64 array of shape ``(N,)``.

    Raises:
        ValueError: On a length mismatch or a missing id.
    """
    g = np.asarray(groups, dtype=object)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    for value in g:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError("groups contains a missing patient id")
    _, codes = np.unique(g.astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of a binary problem via the Mann-Whitney U statistic (ties count one half).

    Numerically identical to ``sklearn.metrics.roc_auc_score`` but without its per-call validation overhead, which
    matters inside a 1000-resample bootstrap.

    Args:
        y_bin: Boolean array, ``True`` for positives.
        score: Scores, higher meaning more likely positive.

    Returns:
        The AUC, or NaN when there are no positives or no negatives.
    """
    n_pos = int(y_bin.sum())
    n_neg = y_bin.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y_bin].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _macro_auc(y: np.ndarray, p: np.ndarray, class_idx: Sequence[int]) -> float:
    """Mean one-vs-rest ROC-AUC over the given classes.

    Args:
        y: Labels, shape ``(N,)``.
        p: Probabilities, shape ``(N, C)``.
        class_idx: Classes to average over.

    Returns:
        The mean, or NaN when any listed class lacks positives or negatives in ``y`` (or the list is empty).
    """
    if len(class_idx) == 0:
        return float("nan")
    return float(np.mean([_binary_auc(y == k, p[:, k]) for k in class_idx]))


def _auc_classes(y: np.ndarray, n_classes: int) -> list[int]:
    """Classes whose one-vs-rest ROC-AUC is defined (at least one positive and one negative).

    Args:
        y: Labels, shape ``(N,)``.
        n_classes: ``C``.

    Returns:
        Sorted class indices.
    """
    counts = np.bincount(y, minlength=n_classes)
    return [k for k in range(n_classes) if 0 < counts[k] < y.size]


def _cm_headline(cm: np.ndarray) -> dict[str, Any]:
    """Headline label metrics from confusion matrices, vectorised over a leading batch axis.

    Mirrors scikit-learn: balanced accuracy is the mean recall over classes present in ``y_true``; macro F1 uses
    ``zero_division=nan`` semantics (a class with TP+FP+FN = 0 is left out of the mean).

    Args:
        cm: Confusion counts, shape ``(B, C, C)`` (rows = true class, columns = predicted class).

    Returns:
        Dict of arrays of shape ``(B,)`` (``accuracy``, ``balanced_accuracy``, ``f1_macro``) and ``(B, C)``
        (``sensitivity``, ``specificity``); NaN where undefined.
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


def _resample_indices(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one patient-level bootstrap resample.

    Draws ``G`` patients with replacement from the ``G`` distinct ids and returns the rows of every drawn patient,
    concatenated in draw order; a patient drawn ``k`` times contributes each of its rows ``k`` times.

    Args:
        groups: Integer group codes ``0..G-1`` of shape ``(N,)`` (as made by ``_group_codes``), or any ids.
        rng: Source of randomness.

    Returns:
        int64 array of row indices into the original data (its length varies with the patients drawn).
    """
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    drawn = rng.integers(0, counts.size, size=counts.size)
    lengths = counts[drawn]
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[drawn], lengths) + offsets]


def _interval(samples: np.ndarray, estimate: float, alpha: float) -> dict[str, Any]:
    """Percentile interval of bootstrap samples, skipping undefined (NaN) resamples.

    Args:
        samples: Bootstrap values, shape ``(B,)``; NaN marks a resample where the metric is undefined.
        estimate: The point estimate on the full data.
        alpha: ``1 - confidence level``.

    Returns:
        ``{"estimate", "lo", "hi", "n_valid", "n_skipped"}``; ``lo``/``hi`` are ``None`` without valid resamples.
    """
    valid = samples[np.isfinite(samples)]
    if valid.size:
        lo, hi = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    else:
        lo = hi = None
    return {
        "estimate": _clean(estimate),
        "lo": _clean(lo),
        "hi": _clean(hi),
        "n_valid": int(valid.size),
        "n_skipped": int(samples.size - valid.size),
    }


# --------------------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------------------


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence: bin ``b`` covers ``(b/n, (b+1)/n]``, and 0 falls in bin 0.

    Args:
        confidence: Values in ``[0, 1]``.
        n_bins: Number of bins.

    Returns:
        int array of bin indices in ``[0, n_bins)``.
    """
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Reliability-diagram data for the top-class confidence.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        n_bins: Number of equal-width bins over ``[0, 1]``; bin ``b`` covers ``(b/n_bins, (b+1)/n_bins]``.

    Returns:
        One dict per bin, in order (empty bins included): ``{"lo", "hi", "confidence", "accuracy", "count"}``, where
        ``confidence`` is the mean top-class probability and ``accuracy`` the fraction of correct top-class
        predictions in the bin (both ``None`` for an empty bin).

    Raises:
        ValueError: On invalid inputs or ``n_bins < 1``.
    """
    y, p = _check_inputs(y_true, probs)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(confidence, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    out = []
    for b in range(n_bins):
        c = int(counts[b])
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "confidence": float(conf_sum[b] / c) if c else None,
                "accuracy": float(acc_sum[b] / c) if c else None,
                "count": c,
            }
        )
    return out


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017) of the top-class confidence.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over equal-width bins (see ``reliability_bins``).

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        n_bins: Number of equal-width bins.

    Returns:
        The ECE in ``[0, 1]``.
    """
    bins = reliability_bins(y_true, probs, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """Fit a temperature by minimising the NLL of ``softmax(logits / T)`` (temperature scaling, Guo et al. 2017).

    The NLL is convex in ``1/T``, hence unimodal in ``log T``; a bounded scalar search on ``log T`` finds the
    global optimum. Fit on a validation split, never on the test split.

    Args:
        logits: Pre-softmax scores, shape ``(N, C)``.
        y_true: Labels, shape ``(N,)``.
        bounds: Search range for ``T``; if the optimum lies outside (e.g. perfectly separable logits, where the
            NLL keeps falling as ``T -> 0``) the nearest bound is returned.

    Returns:
        The fitted temperature ``T > 0``.

    Raises:
        ValueError: On invalid inputs or bounds.
    """
    y, z = _check_inputs(y_true, logits)
    lo, hi = bounds
    if not (0 < lo < hi):
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, y]))

    res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


# --------------------------------------------------------------------------------------------------------------------
# point metrics
# --------------------------------------------------------------------------------------------------------------------


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
    y, p = _check_inputs(y_true, probs, len(classes))
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
    auc_idx = _auc_classes(y, n_classes)
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
            "precision": _clean(precision[k]),
            "recall": _clean(recall[k]),
            "specificity": _clean(tn / (tn + fp)) if tn + fp else None,
            "npv": _clean(tn / (tn + fn)) if tn + fn else None,
            "f1": _clean(f1[k]),
            "support": int(support[k]),
            "n_predicted": int(cm[:, k].sum()),
            "roc_auc": auc,
            "average_precision": ap,
        }
    return {
        "n": int(y.size),
        "classes": classes,
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": _clean(balanced),
        "f1_macro": _clean(f1_macro),
        "f1_weighted": _clean(f1_weighted),
        "cohen_kappa": _clean(kappa),
        "mcc": _clean(mcc),
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
    y, p = _check_inputs(y_true, probs, len(classes))
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


# --------------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------------


def _bootstrap_draws(groups: Any, n: int, n_resamples: int, seed: int) -> tuple[list[np.ndarray], int]:
    """Patient-level resamples for a bootstrap.

    Args:
        groups: Patient ids, shape ``(N,)``.
        n: ``N``.
        n_resamples: Number of resamples ``B``.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``(list of B row-index arrays, number of distinct patients)``.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    codes = _group_codes(groups, n)
    rng = np.random.default_rng(seed)
    return [_resample_indices(codes, rng) for _ in range(n_resamples)], int(codes.max()) + 1


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
    y, p = _check_inputs(y_true, probs, len(classes))
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    n_classes = len(classes)
    draws, n_groups = _bootstrap_draws(groups, y.size, n_resamples, seed)
    pred = p.argmax(axis=1)
    cell = y * n_classes + pred
    present = np.bincount(y, minlength=n_classes) > 0
    auc_idx = _auc_classes(y, n_classes)

    full = _cm_headline(np.bincount(cell, minlength=n_classes**2).reshape(1, n_classes, n_classes))
    full_auc = _macro_auc(y, p, auc_idx)

    cms = np.stack([np.bincount(cell[idx], minlength=n_classes**2) for idx in draws]).reshape(-1, n_classes, n_classes)
    boot = _cm_headline(cms)
    complete = np.all(cms.sum(axis=2)[:, present] > 0, axis=1)  # every class of the full data still present
    boot_auc = np.array(
        [_macro_auc(y[idx], p[idx], auc_idx) if ok else np.nan for idx, ok in zip(draws, complete, strict=True)]
    )
    boot["balanced_accuracy"] = np.where(complete, boot["balanced_accuracy"], np.nan)
    boot["f1_macro"] = np.where(complete, boot["f1_macro"], np.nan)

    metrics = {name: _interval(boot[name], full[name][0], alpha) for name in _HEADLINE[:3]}
    metrics["roc_auc_macro"] = _interval(boot_auc, full_auc, alpha)
    per_class = {
        name: {
            "sensitivity": _interval(boot["sensitivity"][:, k], full["sensitivity"][0, k], alpha),
            "specificity": _interval(boot["specificity"][:, k], full["specificity"][0, k], alpha),
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
    y, pa = _check_inputs(y_true, probs_a)
    _, pb = _check_inputs(y_true, probs_b, pa.shape[1])
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    n_classes = pa.shape[1]
    draws, n_groups = _bootstrap_draws(groups, y.size, n_resamples, seed)
    auc_idx = _auc_classes(y, n_classes)
    auc_a = _macro_auc(y, pa, auc_idx)
    auc_b = _macro_auc(y, pb, auc_idx)
    diffs = np.full(n_resamples, np.nan)
    for i, idx in enumerate(draws):  # _macro_auc is NaN when a class of auc_idx lacks positives or negatives
        diffs[i] = _macro_auc(y[idx], pa[idx], auc_idx) - _macro_auc(y[idx], pb[idx], auc_idx)
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
        "auc_a": _clean(auc_a),
        "auc_b": _clean(auc_b),
        "diff": _clean(auc_a - auc_b),
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


# --------------------------------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------------------------------


def _binary_counts(y_bin: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, int]:
    """Confusion counts of the rule ``score >= threshold`` -> positive.

    Args:
        y_bin: Boolean truth, ``True`` = positive.
        score: Scores.
        threshold: Decision threshold.

    Returns:
        ``{"tp", "fn", "tn", "fp"}``.
    """
    pos = score >= threshold
    return {
        "tp": int(np.sum(pos & y_bin)),
        "fn": int(np.sum(~pos & y_bin)),
        "tn": int(np.sum(~pos & ~y_bin)),
        "fp": int(np.sum(pos & ~y_bin)),
    }


def _sens_spec(counts: dict[str, int]) -> tuple[float | None, float | None]:
    """Sensitivity and specificity from confusion counts (``None`` when undefined).

    Args:
        counts: ``{"tp", "fn", "tn", "fp"}``.

    Returns:
        ``(sensitivity, specificity)``.
    """
    n_pos = counts["tp"] + counts["fn"]
    n_neg = counts["tn"] + counts["fp"]
    return (counts["tp"] / n_pos if n_pos else None, counts["tn"] / n_neg if n_neg else None)


def _as_binary(y: Any, score: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a binary truth vector and its scores.

    Args:
        y: Truth, shape ``(N,)``; nonzero/True = positive.
        score: Scores, shape ``(N,)``.
        name: ``"validation"`` or ``"test"``, for error messages.

    Returns:
        ``(bool array, float64 array)``.
    """
    yb = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if yb.ndim != 1 or s.shape != yb.shape:
        raise ValueError(f"{name} labels and scores must be 1-D of equal length, got {yb.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} scores contain NaN or infinite values")
    return yb, s


def operating_points(
    y_val: np.ndarray,
    score_val: np.ndarray,
    y_test: np.ndarray,
    score_test: np.ndarray,
    sensitivities: Sequence[float] = (0.90, 0.95),
) -> list[dict[str, Any]]:
    """Pick thresholds on validation for target sensitivities and report them on test (binary: positive vs rest).

    A sample is called positive when ``score >= threshold``. For each target the threshold is the *highest* value
    whose validation sensitivity is at least the target (it is always one of the validation positives' scores), which
    maximises validation specificity under the constraint. The test split is only used for reporting.

    Args:
        y_val: Validation truth, shape ``(N_val,)``; 1/True = positive class, 0/False = rest.
        score_val: Validation scores (e.g. ``probs[:, k]``), higher = more likely positive.
        y_test: Test truth, shape ``(N_test,)``.
        score_test: Test scores.
        sensitivities: Target sensitivities, each in ``(0, 1]``.

    Returns:
        One dict per target, in order: ``{"target_sensitivity", "threshold", "val_sensitivity", "val_specificity",
        "test_sensitivity", "test_specificity", "val_counts", "test_counts", "reason"}`` where ``*_counts`` are
        ``{"tp", "fn", "tn", "fp"}`` (``None`` without a threshold) and ``reason`` is ``None`` or a sentence
        explaining why some values are ``None`` (no validation positives, no test positives or negatives, ...).

    Raises:
        ValueError: On malformed inputs or a target outside ``(0, 1]``.
    """
    yv, sv = _as_binary(y_val, score_val, "validation")
    yt, st = _as_binary(y_test, score_test, "test")
    pos_scores = np.sort(sv[yv])[::-1]
    out: list[dict[str, Any]] = []
    for target in sensitivities:
        target = float(target)
        if not 0 < target <= 1:
            raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
        row: dict[str, Any] = {
            "target_sensitivity": target,
            "threshold": None,
            "val_sensitivity": None,
            "val_specificity": None,
            "test_sensitivity": None,
            "test_specificity": None,
            "val_counts": None,
            "test_counts": None,
            "reason": None,
        }
        if pos_scores.size == 0:
            row["reason"] = "no positives in the validation set: no threshold can be chosen"
            out.append(row)
            continue
        k = min(max(int(math.ceil(target * pos_scores.size - 1e-9)), 1), pos_scores.size)
        threshold = float(pos_scores[k - 1])
        val_counts = _binary_counts(yv, sv, threshold)
        test_counts = _binary_counts(yt, st, threshold)
        row["threshold"] = threshold
        row["val_sensitivity"], row["val_specificity"] = _sens_spec(val_counts)
        row["test_sensitivity"], row["test_specificity"] = _sens_spec(test_counts)
        row["val_counts"], row["test_counts"] = val_counts, test_counts
        reasons = []
        if row["val_specificity"] is None:
            reasons.append("no negatives in the validation set")
        if yt.size == 0:
            reasons.append("empty test set")
        else:
            if row["test_sensitivity"] is None:
                reasons.append("no positives in the test set")
            if row["test_specificity"] is None:
                reasons.append("no negatives in the test set")
        row["reason"] = "; ".join(reasons) or None
        out.append(row)
    return out
