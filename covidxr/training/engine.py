"""Training and inference loops: no argument parsing, no printing beyond progress bars."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from covidxr.utils import softmax

# On an accelerator the running loss in the progress bar is refreshed every this many steps (each read waits).
POSTFIX_EVERY = 25


@dataclass
class EpochOutput:
    """Per-sample results of one pass: mean loss, logits (N, C), targets (N,) and dataset indices (N,)."""

    loss: float
    logits: np.ndarray
    targets: np.ndarray
    indices: np.ndarray


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    device: torch.device, amp: Callable, desc: str = "train", channels_last: bool = False,
                    frozen_backbone: bool = False, progress: bool = True) -> EpochOutput:
    """Run one optimisation pass over ``loader`` and return the training predictions.

    ``model`` may be wrapped in ``DistributedDataParallel``; ``progress`` False hides the progress bar.
    """
    model.train()
    if frozen_backbone:
        # Keep BatchNorm statistics of the frozen backbone as pretrained.
        getattr(model, "module", model).backbone.eval()
    # The loss sum and the predictions stay on the device until the end: reading them every step would make
    # the host wait for the GPU and leave it idle while the next step is launched.
    total, count, logits_all, targets_all, index_all = torch.zeros((), device=device), 0, [], [], []
    show_every = 1 if device.type == "cpu" else POSTFIX_EVERY
    bar = progress_bar(loader, progress, desc=desc)
    for step, (images, targets, indices) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with amp():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach().float() * len(targets)
        count += len(targets)
        if progress and step % show_every == 0:
            bar.set_postfix(loss=f"{total.item() / count:.4f}")
        logits_all.append(logits.detach().float())
        targets_all.append(targets)
        index_all.append(indices)
    return collect(total.item(), count, [t.cpu() for t in logits_all], [t.cpu() for t in targets_all], index_all)


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


def summary_metrics(logits: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """Return accuracy, macro F1 and macro one-vs-rest ROC-AUC (NaN when a class is absent)."""
    if len(targets) == 0:
        return {"acc": math.nan, "f1": math.nan, "auc": math.nan}
    probs = softmax(logits)
    preds = probs.argmax(1)
    present = [c for c in range(num_classes) if 0 < (targets == c).sum() < len(targets)]
    aucs = [roc_auc_score(targets == c, probs[:, c]) for c in present]
    return {
        "acc": float(accuracy_score(targets, preds)),
        "f1": float(f1_score(targets, preds, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "auc": float(np.mean(aucs)) if len(present) == num_classes else math.nan,
    }


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Return an LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
