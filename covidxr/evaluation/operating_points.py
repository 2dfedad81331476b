"""Operating points of a positive class: thresholds chosen on validation for target sensitivities, reported on
test, and thresholds chosen earlier applied to new data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def binary_counts(y_bin: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, int]:
    """Confusion counts ``{"tp", "fn", "tn", "fp"}`` of the rule ``score >= threshold`` -> positive."""
    pos = score >= threshold
    return {
        "tp": int(np.sum(pos & y_bin)),
        "fn": int(np.sum(~pos & y_bin)),
        "tn": int(np.sum(~pos & ~y_bin)),
        "fp": int(np.sum(pos & ~y_bin)),
    }


def sensitivity_specificity(counts: dict[str, int]) -> tuple[float | None, float | None]:
    """``(sensitivity, specificity)`` from confusion counts (``None`` when undefined)."""
    n_pos = counts["tp"] + counts["fn"]
    n_neg = counts["tn"] + counts["fp"]
    return (counts["tp"] / n_pos if n_pos else None, counts["tn"] / n_neg if n_neg else None)


def _as_binary(y: Any, score: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a binary truth vector (nonzero = positive) and its scores; ``name`` labels error messages."""
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
        val_counts = binary_counts(yv, sv, threshold)
        test_counts = binary_counts(yt, st, threshold)
        row["threshold"] = threshold
        row["val_sensitivity"], row["val_specificity"] = sensitivity_specificity(val_counts)
        row["test_sensitivity"], row["test_specificity"] = sensitivity_specificity(test_counts)
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


def apply_thresholds(stored: list[dict[str, Any]], y_bin: np.ndarray, score: np.ndarray) -> list[dict[str, Any]]:
    """Report thresholds chosen earlier (rows of :func:`operating_points`, e.g. stored in a checkpoint) on new data.

    The ``val_*`` values are kept as chosen; ``test_*`` are measured on ``y_bin`` (True = positive) and ``score``.
    """
    out = []
    for point in stored:
        row = {k: point.get(k) for k in ("target_sensitivity", "threshold", "val_sensitivity", "val_specificity",
                                         "val_counts")}
        row |= {"test_sensitivity": None, "test_specificity": None, "test_counts": None, "reason": None}
        if row["threshold"] is not None:
            counts = binary_counts(y_bin, score, float(row["threshold"]))
            row["test_sensitivity"], row["test_specificity"] = sensitivity_specificity(counts)
            row["test_counts"] = counts
            pos, neg = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
            row["reason"] = None if pos and neg else "the evaluated data lacks positives or negatives"
        out.append(row)
    return out
