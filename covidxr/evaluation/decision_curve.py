"""Clinical utility: the decision curve of "treat as COVID" (COVID versus the rest) against treating everyone and
treating no one.

Net benefit at a threshold probability ``pt`` (Vickers and Elkin 2006) counts true positives as benefit and false
positives weighted by the odds ``pt / (1 - pt)`` (the harm of an unneeded treatment relative to the benefit of a
needed one that ``pt`` implies): ``NB = sensitivity * prevalence - (1 - specificity) * (1 - prevalence) * pt/(1-pt)``.
With the data's own prevalence this is ``TP/n - FP/n * pt/(1-pt)``; another prevalence (``--prevalence``) re-weights
the same sensitivity and specificity, as for a population where COVID is more or less common.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))
TABLE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7)


def covid_vs_rest(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                  positive: str) -> tuple[np.ndarray, np.ndarray]:
    """``(1 where the label is ``positive`` else 0, the probability of ``positive``)`` per image."""
    k = list(classes).index(positive)
    return (np.asarray(labels) == positive).astype(np.int64), np.asarray(probs, dtype=np.float64)[:, k]


def net_benefit(y: np.ndarray, score: np.ndarray, thresholds: Sequence[float],
                prevalence: float | None = None) -> dict[str, list[float]]:
    """Net benefit of the model (treat where ``score >= pt``), of treating all and of treating none, per threshold.

    Args:
        y: 1 for a positive image, 0 otherwise.
        score: The model's probability of the positive class.
        thresholds: Threshold probabilities ``pt`` in (0, 1).
        prevalence: The prevalence assumed (default: the share of positives in ``y``).

    Returns:
        ``{"threshold", "model", "treat_all", "treat_none"}``, lists aligned with ``thresholds``.

    Raises:
        ValueError: ``y`` has no positive or no negative image, or a threshold or the prevalence is outside (0, 1).
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("net benefit needs positive and negative images")
    prev = float(y.mean()) if prevalence is None else float(prevalence)
    if not 0.0 < prev < 1.0 or any(not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError("prevalence and thresholds must lie in (0, 1)")
    out: dict[str, list[float]] = {"threshold": [], "model": [], "treat_all": [], "treat_none": []}
    for t in thresholds:
        odds = t / (1.0 - t)
        treated = score >= t
        sensitivity = float(treated[y].mean())
        false_positive_rate = float(treated[~y].mean())
        out["threshold"].append(float(t))
        out["model"].append(sensitivity * prev - false_positive_rate * (1.0 - prev) * odds)
        out["treat_all"].append(prev - (1.0 - prev) * odds)
        out["treat_none"].append(0.0)
    return out


def decision_curve(name: str, labels: Sequence[str], probs: np.ndarray, classes: Sequence[str], positive: str,
                   prevalence: float | None = None) -> dict[str, Any]:
    """The decision curve of one evaluated set for metrics.json (``curve``) and its report table (``table``).

    Returns ``{"name", "positive", "prevalence", "prevalence_from", "n", "curve", "table"}``, or with ``note`` and no
    curve when the set lacks positives or negatives.
    """
    y, score = covid_vs_rest(labels, probs, classes, positive)
    base = {"name": name, "positive": positive, "n": int(y.size), "observed_prevalence": float(y.mean()) if y.size
            else None}
    if y.size == 0 or y.all() or not y.any():
        return {**base, "note": f"no curve: the set needs {positive} and other images"}
    prev = float(y.mean()) if prevalence is None else float(prevalence)
    curve = net_benefit(y, score, THRESHOLDS, prev)
    table = net_benefit(y, score, TABLE_THRESHOLDS, prev)
    rows = [{"threshold": t, "model": m, "treat_all": a, "treat_none": 0.0,
             "model_minus_best_default": m - max(a, 0.0)}
            for t, m, a in zip(table["threshold"], table["model"], table["treat_all"], strict=True)]
    return {**base, "prevalence": prev, "prevalence_from": "the set's own" if prevalence is None else "--prevalence",
            "curve": curve, "table": rows}


def plot_decision_curves(curves: Sequence[dict[str, Any]]) -> Figure:
    """Net benefit against threshold probability, one panel per set, with treat-all and treat-none."""
    usable = [c for c in curves if c.get("curve")]
    fig = Figure(figsize=(4.2 * max(1, len(usable)), 3.4))
    axes = fig.subplots(1, max(1, len(usable)), squeeze=False)[0]
    for ax, c in zip(axes, usable, strict=False):
        curve = c["curve"]
        ax.plot(curve["threshold"], curve["model"], label="model", color="#1f4e9c", lw=2)
        ax.plot(curve["threshold"], curve["treat_all"], label=f"treat all as {c['positive']}", color="#9c1f1f",
                ls="--")
        ax.plot(curve["threshold"], curve["treat_none"], label="treat none", color="#5a6275", ls=":")
        ax.set_ylim(-0.05, max(0.05, c["prevalence"] * 1.1))
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.set_title(f"{c['name']} (prevalence {c['prevalence']:.2f})", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
