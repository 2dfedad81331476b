"""Validation of labels and probabilities, and the small numeric helpers the metric modules share.

Conventions shared by every metric function:

* ``y_true``: shape ``(N,)``, integer class indices in ``[0, C)``.
* ``probs``: shape ``(N, C)``, class probabilities (rows sum to 1). The predicted class is ``argmax(probs, axis=1)``
  (ties go to the lowest index).
* ``classes``: ``C`` class names, index-aligned with the columns of ``probs``.
* ``groups``: shape ``(N,)``, patient ids. Bootstrap procedures resample *patients*, so every image of a drawn patient
  enters the resample together (a patient drawn twice contributes all its images twice).

An undefined value (e.g. the ROC-AUC of a class with no positives) is reported as ``None``, never as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def clean(value: Any) -> float | None:
    """Return ``value`` as a JSON-safe float: ``None`` for ``None``, NaN and infinities."""
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def check_inputs(y_true: Any, probs: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(y_true as int64, probs as float64)`` after checking shapes, values and (unless None) ``n_classes``.

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


def group_codes(groups: Any, n: int) -> np.ndarray:
    """Map ``n`` patient ids (any hashable values except ``None``/NaN) to int64 codes ``0..G-1``.

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


def binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of a binary problem via the Mann-Whitney U statistic (ties count one half).

    Numerically identical to ``sklearn.metrics.roc_auc_score`` but without its per-call validation overhead, which
    matters inside a 1000-resample bootstrap. NaN when there are no positives or no negatives.
    """
    n_pos = int(y_bin.sum())
    n_neg = y_bin.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[y_bin].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their average rank: ``scipy.stats.rankdata(values)`` to the bit (the
    same arithmetic), without its per-call overhead, which dominated the bootstrap's AUCs; all NaN when any value is
    NaN, as rankdata propagates it."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(values).any():
        return np.full(values.shape, np.nan)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = np.cumsum(starts)
    bounds = np.r_[np.flatnonzero(starts), values.size]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = 0.5 * (bounds[dense] + bounds[dense - 1] + 1)
    return ranks


def macro_auc(y: np.ndarray, p: np.ndarray, class_idx: Sequence[int]) -> float:
    """Mean one-vs-rest ROC-AUC over the classes ``class_idx``; NaN when one of them lacks positives or negatives
    in ``y`` (or the list is empty)."""
    if len(class_idx) == 0:
        return float("nan")
    return float(np.mean([binary_auc(y == k, p[:, k]) for k in class_idx]))


def auc_classes(y: np.ndarray, n_classes: int) -> list[int]:
    """Sorted indices of the classes whose one-vs-rest ROC-AUC is defined (at least one positive and one negative)."""
    counts = np.bincount(y, minlength=n_classes)
    return [k for k in range(n_classes) if 0 < counts[k] < y.size]
