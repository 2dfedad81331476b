"""Subgroups where the data's metadata has them (sex, age band, view, source): per-subgroup recall and COVID-vs-rest
ROC-AUC with patient-bootstrap intervals and counts, flagged where a group is too small to say anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidxr.evaluation.arrays import binary_auc, clean
from covidxr.evaluation.bootstrap import bootstrap_ci
from covidxr.evaluation.covid_vs_rest import covid_vs_rest

MIN_IMAGES = 20
SMALL_RULE = (f"too small: fewer than {MIN_IMAGES} images, or the positive class or the rest missing (no ROC-AUC); "
              "its numbers are shown but say little")
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
COLUMNS = ("sex", "age_band", "view", "source")


def age_band(values: pd.Series) -> pd.Series:
    """Age in years -> band (``<18``, ``18-39``, ``40-59``, ``60-79``, ``80+``); blank or unreadable -> ``""``."""
    ages = pd.to_numeric(values, errors="coerce")
    out = pd.Series("", index=values.index, dtype=object)
    for lo, hi, name in AGE_BANDS:
        out[(ages >= lo) & (ages < hi)] = name
    return out


def with_bands(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with an ``age_band`` column when it has ``age``; ``sex`` lower-cased."""
    frame = frame.copy()
    if "age" in frame.columns:
        frame["age_band"] = age_band(frame["age"])
    if "sex" in frame.columns:
        frame["sex"] = frame["sex"].fillna("").astype(str).str.strip().str.lower()
    return frame


def _group(rows: pd.DataFrame, classes: Sequence[str], positive: str | None, n_boot: int,
           seed: int) -> dict[str, Any]:
    """Counts, recall per class and COVID-vs-rest AUC (with intervals when ``n_boot``) of one subgroup."""
    probs = rows[list(classes)].to_numpy(dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    y = rows["label"].map(index).to_numpy()
    patients = rows["patient_id"].astype(str).to_numpy() if "patient_id" in rows else np.arange(len(rows))
    counts = {c: int((y == k).sum()) for k, c in enumerate(classes)}
    predicted = probs.argmax(axis=1)
    recall: dict[str, Any] = {c: (float((predicted[y == k] == k).mean()) if counts[c] else None)
                              for k, c in enumerate(classes)}
    auc: Any = None
    has_both = positive is not None and 0 < counts[positive] < len(rows)
    if n_boot:
        ci = bootstrap_ci(y, probs, patients, classes, n_resamples=n_boot, seed=seed)
        recall = {c: ci["per_class"][c]["sensitivity"] if counts[c] else None for c in classes}
    if has_both:
        k = index[positive]
        auc = clean(binary_auc(y == k, probs[:, k]))
        if n_boot:
            auc = covid_vs_rest("", y, probs, list(patients), classes, positive, None, n_boot, seed)["auc"]
    reasons = ([f"n < {MIN_IMAGES}"] if len(rows) < MIN_IMAGES else []) + \
        ([] if has_both else [f"no {positive} or no other image" if positive else "no positive class"])
    return {"n": int(len(rows)), "patients": int(len(set(patients))), "class_counts": counts, "recall": recall,
            "auc_vs_rest": auc, "small": bool(reasons), "flag": ", ".join(reasons)}


def subgroups(frame: pd.DataFrame, classes: Sequence[str], positive: str | None, n_boot: int = 0,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per metadata column that the frame has (``sex``, ``age_band``, ``view``, ``source``): per value, the group's
    counts, recall per class, COVID-vs-rest AUC and whether it is too small (:data:`SMALL_RULE`).

    Args:
        frame: Predictions (``label``, one probability column per class, maybe ``patient_id`` and metadata).
        classes: The checkpoint's classes.
        positive: The class scored against the rest (None: no AUC).
        n_boot: Patient-bootstrap resamples of the intervals (0: point values only).
        seed: Bootstrap seed.

    Returns:
        ``{column: {value: group}}``; a column with fewer than two known values is left out. Rows without a value
        form the group ``(unknown)``.
    """
    frame = with_bands(frame)
    out: dict[str, dict[str, Any]] = {}
    for column in COLUMNS:
        if column not in frame.columns:
            continue
        values = frame[column].fillna("").astype(str).str.strip().replace("", "(unknown)")
        if values[values != "(unknown)"].nunique() < 2:
            continue
        known = [b for _, _, b in AGE_BANDS] if column == "age_band" else sorted(set(values) - {"(unknown)"})
        order = [v for v in [*known, "(unknown)"] if (values == v).any()]
        out[column] = {v: _group(frame[values == v], classes, positive, n_boot, seed) for v in order}
    return out
