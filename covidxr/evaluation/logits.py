"""The model's logits for the evaluated rows and for the validation rows that calibrate them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidxr.batches import predict_loader
from covidxr.data.loaders import make_loaders
from covidxr.evaluation.inputs import EvalData
from covidxr.models import XrayClassifier, model_from_checkpoint
from covidxr.tta import TTAClassifier
from covidxr.utils import amp_dtype, autocast, pick_device


@dataclass
class SplitOutputs:
    """Logits of the evaluated rows and of the validation rows used for calibration."""

    table: pd.DataFrame  # evaluated rows (manifest columns plus run_split)
    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    val_logits: np.ndarray | None  # (N_val, C), None without a validation split
    val_y: np.ndarray | None


def build_eval_model(ckpt: dict[str, Any], device: torch.device) -> XrayClassifier:
    """Rebuild the checkpoint's model in eval mode on ``device``."""
    return model_from_checkpoint(ckpt, str(ckpt.get("path", "checkpoint"))).to(device).eval()


def predict_splits(ckpt: dict[str, Any], data: EvalData, device_name: str, tta: bool = False) -> SplitOutputs:
    """Predict logits for the validation and evaluated rows with the run's loaders (``data.run.table.split`` is
    each row's loader role); the validation rows' are None when there are none. With ``tta`` the logits are the
    log mean probabilities over :data:`covidxr.tta.VIEWS`."""
    config = ckpt.get("config") or {}
    device = pick_device(device_name)
    model = build_eval_model(ckpt, device)
    if tta:
        model = TTAClassifier(model).eval()
    # As in training: channels_last and mixed precision unless the run turned them off (both on by default).
    channels_last = bool(config.get("channels_last", True)) and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = autocast(device, amp_dtype(device) if config.get("amp", True) else None)
    table = data.run.table
    roles = table["split"].to_numpy()
    index = {c: i for i, c in enumerate(ckpt["classes"])}
    logits = np.full((len(table), len(index)), np.nan)
    for role, loader in make_loaders(data.run, data.settings, device, data.settings.seed).items():
        out = predict_loader(model, loader, device, amp, desc=f"predict {role}", channels_last=channels_last)
        logits[np.flatnonzero(roles == role)[out.indices]] = out.logits
    y = table["label"].map(index).to_numpy(dtype=np.int64)
    if data.own and data.split == "val":
        evaluated = roles == "val"
    else:
        evaluated = roles != "skip" if data.own and data.split == "all" else roles == "test"
    has_val = data.own and (roles == "val").any()
    rows = table[evaluated].assign(split=data.run_split[evaluated].values)
    return SplitOutputs(rows.reset_index(drop=True), logits[evaluated], y[evaluated],
                        logits[roles == "val"] if has_val else None, y[roles == "val"] if has_val else None)
