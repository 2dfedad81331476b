"""COVID or not: the question a clinician brings, as a binary score (the probability of the COVID class against
every other class) with its ROC-AUC and the sensitivity and specificity at one threshold fixed before testing, each
with a patient-bootstrap 95% interval.

The threshold is chosen where the model had not seen the source when one can (the held-out-source folds of
``python -m covidxr.crossval``), else on the run's validation split, by Youden's J (the highest sensitivity +
specificity); it is then applied unchanged to the internal test split, to each source in it, to every held-out
source and to every external folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from covidxr.evaluation.arrays import binary_auc
from covidxr.evaluation.bootstrap import bootstrap_draws, percentile_interval
from covidxr.evaluation.operating_points import binary_counts, sensitivity_specificity


def youden_threshold(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """The threshold (``score >= t`` -> positive) with the highest sensitivity + specificity on these data; None
    when the data lack a positive or a negative."""
    y_bin = np.asarray(y_bin, dtype=bool)
    if y_bin.all() or not y_bin.any():
        return None
    fpr, tpr, thresholds = roc_curve(y_bin, np.asarray(score, dtype=np.float64))
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf


def _point(y_bin: np.ndarray, score: np.ndarray, threshold: float | None) -> tuple[float, float, float]:
    """``(AUC, sensitivity, specificity)`` with NaN where undefined."""
    auc = binary_auc(y_bin, score)  # NaN without a positive or a negative
    if threshold is None:
        return auc, float("nan"), float("nan")
    sens, spec = sensitivity_specificity(binary_counts(y_bin, score, threshold))
    return auc, float("nan") if sens is None else sens, float("nan") if spec is None else spec


def covid_vs_rest(name: str, y: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str], classes: Sequence[str],
                  positive: str, threshold: float | None, n_resamples: int, seed: int) -> dict[str, Any]:
    """COVID-vs-rest of one set of films.

    Args:
        name: What the set is ("internal test", a source, an external folder).
        y: Labels ``(N,)`` as class indices; probs: calibrated probabilities ``(N, C)``.
        patient_ids: ``(N,)``, the bootstrap's unit.
        classes: ``C`` names; positive: the COVID class.
        threshold: The fixed threshold on ``probs[:, positive]`` (None: sensitivity and specificity undefined).
        n_resamples: Bootstrap resamples (0: point values only, intervals None).
        seed: Bootstrap seed.

    Returns:
        ``{"name", "n_positive", "n_negative", "threshold", "auc", "sensitivity", "specificity"}``, each metric an
        interval ``{"estimate", "lo", "hi", ...}`` (estimate None where undefined: AUC needs both kinds of film).
    """
    y_bin = np.asarray(y) == list(classes).index(positive)
    score = np.asarray(probs, dtype=np.float64)[:, list(classes).index(positive)]
    full = _point(y_bin, score, threshold)
    if n_resamples and len(y_bin):
        draws, _ = bootstrap_draws(list(patient_ids), len(y_bin), n_resamples, seed)
        boot = np.array([_point(y_bin[idx], score[idx], threshold) for idx in draws])
    else:
        boot = np.full((0, 3), np.nan)
    metrics = {key: percentile_interval(boot[:, i], full[i], 0.05) for i, key in
               enumerate(("auc", "sensitivity", "specificity"))}
    if not n_resamples:
        metrics = {k: {**v, "lo": None, "hi": None} for k, v in metrics.items()}
    return {"name": name, "n_positive": int(y_bin.sum()), "n_negative": int((~y_bin).sum()), "threshold": threshold,
            **metrics}


def absent_class_calls(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """For each class with no film in ``y``: how many films the model called that class (its argmax)."""
    present = set(np.asarray(y).tolist())
    called = np.asarray(probs).argmax(axis=1)
    return {c: int((called == k).sum()) for k, c in enumerate(classes) if k not in present}


def choose_threshold(y_bin: np.ndarray | None, score: np.ndarray | None, stored: dict[str, Any] | None,
                     where: str) -> tuple[float | None, str]:
    """``(threshold, where it was chosen)``: Youden's J on ``(y_bin, score)`` (the held-out folds or the validation
    split, named by ``where``) when given, else the threshold an earlier evaluation stored, else None."""
    if y_bin is not None and score is not None:
        threshold = youden_threshold(y_bin, score)
        if threshold is not None:
            return threshold, f"Youden's J on {where}"
    if stored and stored.get("threshold") is not None:
        return float(stored["threshold"]), str(stored.get("chosen_on") or "stored with the checkpoint's calibration")
    return None, "none: no validation or held-out films with both COVID and other films"


def internal_sets(table: Any, y: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: str,
                  threshold: float | None, n_resamples: int, seed: int, split: str) -> list[dict[str, Any]]:
    """COVID-vs-rest of the evaluated split, then of each source in it that has COVID and other films."""
    ids = table["patient_id"].astype(str).tolist()
    out = [covid_vs_rest(f"internal {split}", y, probs, ids, classes, positive, threshold, n_resamples, seed)]
    k = list(classes).index(positive)
    sources = table["source"].astype(str) if "source" in table.columns else None
    for source in ([] if sources is None else sorted(set(sources) - {""})):
        rows = (sources == source).to_numpy()
        if 0 < (y[rows] == k).sum() < rows.sum():
            out.append(covid_vs_rest(f"internal {split}: {source}", y[rows], probs[rows],
                                     [i for i, r in zip(ids, rows, strict=True) if r], classes, positive, threshold,
                                     n_resamples, seed))
    return out
