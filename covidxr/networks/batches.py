"""Per-sample results of one pass over a loader, and the inference pass itself (shared by training and evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class EpochOutput:
    """Per-sample results of one pass: mean loss, logits (N, C), targets (N,) and dataset indices (N,)."""

    loss: float
    logits: np.ndarray
    targets: np.ndarray
    indices: np.ndarray


@torch.inference_mode()
def predict_loader(model: nn.Module, loader: Iterable, device: torch.device, amp: Callable,
                   criterion: nn.Module | None = None, desc: str = "eval", channels_last: bool = False,
                   progress: bool = True) -> EpochOutput:
    """Return logits for every sample of ``loader`` (and the mean loss when ``criterion`` is given).

    The model's train/eval mode is restored afterwards; ``progress`` False hides the progress bar.
    """
    was_training = model.training
    model.eval()
    total, count, logits_all, targets_all, index_all = 0.0, 0, [], [], []
    try:
        for images, targets, indices in progress_bar(loader, progress, desc=desc):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp():
                logits = model(images).float()
            if criterion is not None:
                total += criterion(logits, targets.to(device, non_blocking=True)).item() * len(targets)
            count += len(targets)
            logits_all.append(logits.cpu())
            targets_all.append(targets.cpu())
            index_all.append(torch.as_tensor(indices))
    finally:
        model.train(was_training)
    return collect(total, count, logits_all, targets_all, index_all)


def progress_bar(iterable: Iterable, progress: bool = True, **kwargs) -> tqdm:
    """A transient tqdm bar over ``iterable``; ``progress`` False hides it (else $TQDM_DISABLE still applies)."""
    kwargs = {"leave": False, "dynamic_ncols": True, **kwargs}
    return tqdm(iterable, **kwargs) if progress else tqdm(iterable, disable=True, **kwargs)


def collect(total: float, count: int, logits: list, targets: list, indices: list) -> EpochOutput:
    """Assemble an :class:`EpochOutput` from a pass's summed loss, sample count and per-batch tensors."""
    return EpochOutput(
        loss=total / max(count, 1),
        logits=torch.cat(logits).numpy() if logits else np.zeros((0, 0), dtype=np.float32),
        targets=torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64),
        indices=torch.cat([torch.as_tensor(i) for i in indices]).numpy() if indices else np.zeros(0, dtype=np.int64),
    )
