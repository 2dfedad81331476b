"""Calibration: reliability-diagram bins, expected calibration error and temperature scaling (Guo et al. 2017)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from covidxr.evaluation.arrays import check_inputs


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence in [0, 1]: bin ``b`` covers ``(b/n, (b+1)/n]``, and 0 falls in bin 0."""
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
    y, p = check_inputs(y_true, probs)
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
    y, z = check_inputs(y_true, logits)
    lo, hi = bounds
    if not (0 < lo < hi):
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, y]))

    res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))
