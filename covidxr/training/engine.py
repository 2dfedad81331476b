"""The training loop, its summary metrics and learning-rate schedule: no argument parsing, no printing beyond
progress bars (the inference pass is :func:`covidxr.networks.batches.predict_loader`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

from covidxr.networks.batches import EpochOutput, collect, progress_bar
from covidxr.utils import softmax

# On an accelerator the running loss in the progress bar is refreshed every this many steps (each read waits).
POSTFIX_EVERY = 25


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    device: torch.device, amp: Callable, desc: str = "train", channels_last: bool = False,
                    frozen_backbone: bool = False, progress: bool = True,
                    sources: torch.Tensor | None = None) -> EpochOutput:
    """Run one optimisation pass over ``loader`` and return the training predictions.

    ``model`` may be wrapped in ``DistributedDataParallel``; ``progress`` False hides the progress bar. With
    ``sources`` (each training row's source index) ``model`` is an
    :class:`~covidxr.training.adversary.AdversarialNetwork` and its source loss is added to the class loss (the
    returned loss is the class loss alone).
    """
    model.train()
    if frozen_backbone:
        # Keep BatchNorm statistics of the frozen backbone as pretrained.
        getattr(model, "module", model).backbone.eval()
    # The loss sum and the predictions stay on the device until the end: reading them every step would make
    # the host wait for the GPU and leave it idle while the next step is launched.
    total, count, logits_all, targets_all, index_all = torch.zeros((), device=device), 0, [], [], []
    source_total = torch.zeros((), device=device)
    show_every = 1 if device.type == "cpu" else POSTFIX_EVERY
    bar = progress_bar(loader, progress, desc=desc)
    for step, (images, targets, indices) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with amp():
            if sources is None:
                logits = model(images)
                loss = objective = class_loss(criterion, logits, targets, indices)
            else:
                logits, source_loss = model(images, targets, sources[torch.as_tensor(indices)].to(device))
                loss = class_loss(criterion, logits, targets, indices)
                objective = loss + source_loss
                source_total += source_loss.detach().float() * len(targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach().float() * len(targets)
        count += len(targets)
        if progress and step % show_every == 0:
            extra = {} if sources is None else {"source_loss": f"{source_total.item() / count:.4f}"}
            bar.set_postfix(loss=f"{total.item() / count:.4f}", **extra)
        logits_all.append(logits.detach().float())
        targets_all.append(targets)
        index_all.append(indices)
    return collect(total.item(), count, [t.cpu() for t in logits_all], [t.cpu() for t in targets_all], index_all)


def class_loss(criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor, rows) -> torch.Tensor:
    """``criterion``'s loss; a criterion with ``needs_rows`` (:class:`~covidxr.training.contrast.SourceContrastLoss`)
    also gets the films' positions in the training split."""
    if getattr(criterion, "needs_rows", False):
        return criterion(logits, targets, rows)
    return criterion(logits, targets)


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
