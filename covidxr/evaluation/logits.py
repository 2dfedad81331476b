"""The model's logits for the evaluated rows and for the validation rows that calibrate them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidxr.data.loaders import make_loaders
from covidxr.evaluation.inputs import EvalData
from covidxr.model.trained import TrainedModel


@dataclass
class SplitOutputs:
    """Logits of the evaluated rows and of the validation rows used for calibration."""

    table: pd.DataFrame  # evaluated rows (manifest columns plus run_split)
    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    val_logits: np.ndarray | None  # (N_val, C), None without a validation split
    val_y: np.ndarray | None


def _evaluated(data: EvalData) -> np.ndarray:
    """Which rows of ``data.run.table`` are evaluated (the rest are the validation rows, or skipped)."""
    roles = data.run.table["split"].to_numpy()
    if data.own and data.split == "val":
        return roles == "val"
    return roles != "skip" if data.own and data.split == "all" else roles == "test"


def evaluated_table(data: EvalData) -> pd.DataFrame:
    """The evaluated rows (manifest columns, ``split`` the run's split), in the order of :class:`SplitOutputs`."""
    evaluated = _evaluated(data)
    return data.run.table[evaluated].assign(split=data.run_split[evaluated].values).reset_index(drop=True)


def predict_splits(model: TrainedModel, data: EvalData, tta: bool = False,
                   known: Mapping[str, np.ndarray] | None = None) -> SplitOutputs:
    """Predict logits for the validation and evaluated rows with the run's loaders (``data.run.table.split`` is
    each row's loader role); the validation rows' are None when there are none. With ``tta`` the logits are the
    log mean probabilities over :data:`covidxr.networks.tta.VIEWS`. The model runs as the predictor runs it
    (:meth:`covidxr.model.trained.TrainedModel.run_loader`: float32 on every device), so the report's probabilities are
    the app's.

    ``known`` are logits by path already computed from the same films (the evaluation's film pass,
    :mod:`covidxr.evaluation.film_pass`): a loader whose rows all have them is not run (not with ``tta``)."""
    table = data.run.table
    roles = table["split"].to_numpy()
    index = {c: i for i, c in enumerate(model.classes)}
    logits = np.full((len(table), len(index)), np.nan)
    if known and not tta:
        for row, path in enumerate(table["path"].astype(str)):
            if path in known:
                logits[row] = known[path]
    for role, loader in make_loaders(data.run, data.settings, model.device, data.settings.seed).items():
        rows = np.flatnonzero(roles == role)
        if known and not tta and not np.isnan(logits[rows]).any():
            continue
        out = model.run_loader(loader, desc=f"predict {role}", tta=tta)
        logits[rows[out.indices]] = out.logits
    y = table["label"].map(index).to_numpy(dtype=np.int64)
    evaluated = _evaluated(data)
    has_val = data.own and (roles == "val").any()
    return SplitOutputs(evaluated_table(data), logits[evaluated], y[evaluated],
                        logits[roles == "val"] if has_val else None, y[roles == "val"] if has_val else None)
