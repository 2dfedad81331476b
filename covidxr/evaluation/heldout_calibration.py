"""Calibration where the source was unseen: the temperature and the COVID threshold fitted on the out-of-source
predictions of the held-out-source folds (``python -m covidxr.crossval``), instead of on validation films from the
training hospitals, which reward the shortcut and make the probabilities overconfident on a new hospital.

The folds must have trained the same recipe as the checkpoint (whole network, same architecture, input size, input
pipeline and balance): a linear probe's logits have another scale, so probe folds are not used (the reason is
reported, and the validation split is used instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxr.data.loaders import DataSettings
from covidxr.preprocessing.settings import InputRecord


@dataclass(frozen=True)
class HeldOutLogits:
    """Pooled out-of-source logits of every valid fold."""

    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    sources: list[str]  # the held-out sources pooled

    def describe(self) -> str:
        return (f"the {len(self.y)} films of {len(self.sources)} held-out sources (crossval folds trained without "
                "them, same recipe)")


def _recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """What must match between the folds and the checkpoint: architecture, input size, balance and the recorded input
    pipeline (with its defaults and the lung-mask rule of :class:`~covidxr.preprocessing.settings.InputRecord`)."""
    return {"arch": settings.get("arch"), "img_size": settings.get("img_size"),
            "balance": settings.get("balance", DataSettings.balance), **InputRecord.from_dict(settings).input_record()}


def recipe_mismatch(crossval: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why the folds' predictions cannot calibrate a checkpoint trained with ``config`` (None: they can)."""
    if crossval.get("mode") != "finetune":
        return f"the crossval folds are mode {crossval.get('mode')!r} (a linear probe, another model), not finetune"
    folds, checkpoint = _recipe(crossval), _recipe(config)
    for key, theirs in folds.items():
        ours = checkpoint[key]
        if theirs != ours:
            return f"the crossval folds used {key}={theirs!r}, the checkpoint {key}={ours!r}"
    return None


def load_heldout_logits(crossval: dict[str, Any] | None, config: dict[str, Any],
                        classes: list[str]) -> tuple[HeldOutLogits | None, str]:
    """``(pooled held-out logits, why not)``: None with the reason when the crossval is missing or unusable."""
    if crossval is None:
        return None, "no held-out-source crossval beside the checkpoint"
    why = recipe_mismatch(crossval, config)
    if why:
        return None, why
    if list(crossval.get("classes") or []) != classes:
        return None, "the crossval's classes differ from the checkpoint's"
    folder = Path(crossval["file"]).parent
    logits, labels, sources = [], [], []
    for fold in crossval["folds"]:
        if not fold.get("valid", True) or not fold.get("logits_csv"):
            continue
        frame = pd.read_csv(folder / fold["logits_csv"], dtype={"label": str}, keep_default_na=False)
        logits.append(frame[[f"logit_{c}" for c in classes]].to_numpy(dtype=np.float64))
        labels.append(frame["label"].map({c: k for k, c in enumerate(classes)}).to_numpy(dtype=np.int64))
        sources.append(str(fold["name"]))
    if not logits:
        return None, "the crossval has no valid fold with saved held-out logits"
    return HeldOutLogits(np.concatenate(logits), np.concatenate(labels), sources), ""
