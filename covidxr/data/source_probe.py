"""Source probe: how well a checkpoint's pooled backbone features predict where an image came from.

A linear probe is cross-validated, grouped by patient, over all images and within each class that has several
sources. A within-class ROC-AUC well above 0.5 means the features carry a site signature that the classifier can
use as a shortcut instead of the disease.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidxr.data.cache import fill_cache
from covidxr.data.confounding import source_column
from covidxr.model.input_pipeline import PLAIN, InputPipeline
from covidxr.model.trained import TrainedModel


def _features(model: Any, paths: Sequence[str], img_size: int, cache_dir: Path | None, batch_size: int,
              workers: int, pipeline: InputPipeline = PLAIN) -> tuple[np.ndarray, np.ndarray]:
    """Return pooled features of the readable images and a mask of which paths were readable."""
    decoded = fill_cache(list(paths), img_size, cache_dir, workers=workers, desc="probe features",
                         pipeline=pipeline)
    ok = np.array([img is not None for img in decoded.images], dtype=bool)
    squares = [img for img in decoded.images if img is not None]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(squares), batch_size):
            batch = torch.from_numpy(np.stack(squares[start : start + batch_size])).float().div(255.0)[:, None]
            chunks.append(model.features(batch).flatten(1).numpy())
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return feats, ok


def probe_auc(features: np.ndarray, sources: Sequence[str], groups: Sequence[str], folds: int = 5,
              seed: int = 0) -> dict[str, Any]:
    """Cross-validated ROC-AUC of a logistic-regression probe predicting ``sources`` from ``features``.

    Folds are grouped by patient (StratifiedGroupKFold). Sources with fewer than two patients are left out. The
    AUC is binary for two sources, else one-vs-rest macro-averaged; it is computed on out-of-fold probabilities.

    Returns:
        ``auc`` (None when it cannot be computed, with ``reason``), ``n_images``, ``folds`` and ``sources``
        (images per source used).
    """
    frame = pd.DataFrame({"source": list(sources), "group": list(groups)})
    patients = frame.groupby("source")["group"].nunique()
    usable = patients.index[patients >= 2]
    keep = frame["source"].isin(usable).to_numpy()
    result: dict[str, Any] = {"auc": None, "n_images": int(keep.sum()), "folds": 0,
                              "sources": {str(k): int(v) for k, v in frame["source"][keep].value_counts().items()},
                              "left_out_sources": sorted(str(s) for s in patients.index if s not in set(usable))}
    if len(usable) < 2:
        result["reason"] = "fewer than two sources with at least two patients each"
        return result
    y, groups_kept, x = frame["source"][keep].to_numpy(), frame["group"][keep].to_numpy(), features[keep]
    k = int(min(folds, patients[usable].min()))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        proba = cross_val_predict(probe, x, y, groups=groups_kept, cv=cv, method="predict_proba")
    classes = np.unique(y)
    if len(classes) == 2:
        auc = roc_auc_score((y == classes[1]).astype(int), proba[:, 1])
    else:
        auc = roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    result.update(auc=round(float(auc), 4), folds=k)
    return result


def source_probe(table: pd.DataFrame, checkpoint: str | os.PathLike, folds: int = 5, seed: int = 0,
                 batch_size: int = 32, cache_dir: Path | None = None, workers: int = 0) -> dict[str, Any]:
    """Measure how well a checkpoint's backbone features predict the source of an image.

    Images are read with the shared reader, letterboxed to the checkpoint's ``preprocess.img_size`` (through the
    decode-once cache, as in training) and passed through the backbone; a linear probe is cross-validated, grouped
    by patient (:func:`probe_auc`), once over all images and once within each class that has at least two sources.

    Args:
        table: manifest table (``path``, ``label``, ``source``, ``patient_id``).
        checkpoint: a covidxr checkpoint.
        folds: at most this many cross-validation folds.
        seed: fold shuffling seed.
        batch_size: images per forward pass.
        cache_dir: decode cache folder (None: decode without storing).
        workers: decoding processes (0: in this process).

    Returns:
        ``overall`` and ``per_class`` probe results, plus ``checkpoint``, ``arch``, ``img_size``,
        ``n_features`` and ``unreadable`` (count).

    Raises:
        CheckpointError: the checkpoint cannot be loaded or does not fit its architecture.
    """
    trained = TrainedModel.load(checkpoint, device="cpu")
    img_size = trained.img_size
    with torch.inference_mode():
        feats, ok = _features(trained.network, table["path"].tolist(), img_size, cache_dir, batch_size, workers,
                              trained.pipeline)
    readable = table[ok].reset_index(drop=True)
    sources = source_column(readable)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "arch": trained.record["arch"], "img_size": int(img_size),
        "n_features": int(feats.shape[1]) if feats.size else 0, "unreadable": int((~ok).sum()),
        "overall": probe_auc(feats, sources, readable["patient_id"], folds, seed), "per_class": {},
    }
    for label in sorted(readable["label"].unique()):
        mask = (readable["label"] == label).to_numpy()
        if sources[mask].nunique() >= 2:
            result["per_class"][str(label)] = probe_auc(feats[mask], sources[mask], readable["patient_id"][mask],
                                                        folds, seed)
    return result
