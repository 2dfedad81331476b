"""How much of the model's attention falls on the lungs: the mean share of the Grad-CAM mass (of the predicted class)
inside the lung mask, over up to ``--lung-share-limit`` images of a split, for metrics.json's ``"lung_share"``.

The heatmap is the predictor's (on the original image; for a lung-cropping checkpoint the crop is undone and its own
lung model gives the mask). A checkpoint without a lung crop is measured with the installed lung model
(``covidxr.lungs.load_lung_model``); without one the measurement is skipped with a note.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from covidxr.errors import CheckpointError, one_line
from covidxr.evaluation.film_pass import FilmPass
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel, load_lung_model

log = logging.getLogger("covidxr.evaluate")

METHOD = "gradcam of the predicted class"


def pick_rows(table: pd.DataFrame, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` image paths of ``table`` (all of them when fewer), a seeded random choice."""
    if len(table) > limit:
        table = table.sample(n=limit, random_state=seed)
    return table["path"].astype(str).tolist()


def lung_model_for(predictor: Predictor) -> tuple[LungModel | None, str]:
    """The lung model that masks the images (the checkpoint's, else the installed one) and where it came from."""
    if predictor.pipeline.lungs is not None:
        return predictor.pipeline.lungs, "the checkpoint's lung model"
    try:
        return load_lung_model(), "the installed lung model"
    except CheckpointError as exc:
        return None, one_line(exc)


def lung_share_summary(predictor: Predictor, table: pd.DataFrame, limit: int, films: FilmPass,
                       seed: int = 0) -> dict[str, Any]:
    """metrics.json's ``"lung_share"``: ``mean``, ``median``, ``n``, ``method`` (and ``lung_model``), or with ``note``
    (and None values) when it was skipped (``limit`` 0, or no lung model installed). ``predictor`` wraps the
    evaluation's one trained model (torch); ``films``, the set's film pass, holds the shares of the sample
    (:func:`pick_rows`, the same ``limit`` and ``seed``)."""
    empty = {"mean": None, "median": None, "n": 0, "method": METHOD}
    if limit <= 0:
        return {**empty, "note": "skipped (--lung-share-limit 0)"}
    lungs, origin = lung_model_for(predictor)
    if lungs is None:
        log.warning("lung share skipped: %s", origin)
        return {**empty, "note": f"skipped: {origin}"}
    paths = pick_rows(table, limit, seed)
    found = [films.films.get(p) for p in paths]
    shares = [float(f.lung_share) for f in found if f is not None and f.lung_share is not None
              and np.isfinite(f.lung_share)]
    if not shares:
        return {**empty, "note": "no image had a heatmap", "lung_model": origin}
    return {"mean": float(np.mean(shares)), "median": float(np.median(shares)), "n": len(shares), "method": METHOD,
            "lung_model": origin}
