"""Feature cache for frozen-backbone epochs: one backbone pass per image, then the head trains on features.

While the backbone is frozen (the first ``--freeze-epochs`` epochs, or every epoch with ``--linear-probe``)
its output for an image only depends on the pixels it is given. The features are therefore computed once,
in eval mode and **without augmentation** (the evaluation resize), and the head is trained on them: an epoch
costs a few matrix products instead of a forward pass of the network over every image. The price is that
frozen epochs see un-augmented images; ``--no-feature-cache`` restores augmented passes through the frozen
backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from covidxr.networks.batches import EpochOutput, collect, progress_bar


@dataclass
class FeatureSet:
    """Backbone features of one split: (N, F) float32 and (N,) class indices, on the compute device."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device, amp: Callable,
                     channels_last: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Run the backbone once over ``loader`` in eval mode.

    ``no_grad`` rather than ``inference_mode``: the head later trains on these tensors, and autograd may not
    save inference tensors for backward.

    Returns:
        (features (M, F) float32, targets (M,), indices (M,)) on ``device``, in loader order.
    """
    was_training = model.training
    model.eval()
    feats, targets_all, index_all = [], [], []
    try:
        for images, targets, indices in progress_bar(loader, progress, desc="features"):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp():
                feats.append(model.features(images).float())
            targets_all.append(torch.as_tensor(targets).to(device, non_blocking=True))
            index_all.append(torch.as_tensor(indices).to(device, non_blocking=True))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(targets_all), torch.cat(index_all)


def assemble(features: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, n: int) -> FeatureSet:
    """Place rows by dataset index into an ``n``-row :class:`FeatureSet` (repeated indices carry equal rows).

    Raises:
        ValueError: some index in ``range(n)`` has no row.
    """
    out = features.new_zeros((n, features.shape[1]))
    out_targets = targets.new_zeros(n)
    seen = torch.zeros(n, dtype=torch.bool, device=features.device)
    out[indices] = features
    out_targets[indices] = targets
    seen[indices] = True
    if not bool(seen.all()):
        raise ValueError(f"features missing for {int((~seen).sum())} of {n} samples")
    return FeatureSet(out, out_targets)


def train_head_epoch(head: nn.Module, features: FeatureSet, batches: Iterable[list[int]], criterion: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     scaler: torch.amp.GradScaler, amp: Callable, after_backward: Callable[[], None] | None = None,
                     desc: str = "head", progress: bool = True) -> EpochOutput:
    """One optimisation pass of ``head`` over cached features, batch by batch as ``batches`` orders them.

    The optimizer may hold other (frozen) parameters: those have no gradient and are left alone.
    ``after_backward`` runs between backward and the optimizer step (gradient averaging across ranks).
    """
    head.train()
    total, count, logits_all, targets_all, index_all = 0.0, 0, [], [], []
    device = features.features.device
    bar = progress_bar(batches, progress, desc=desc)
    for batch in bar:
        positions = torch.as_tensor(batch, dtype=torch.long)
        on_device = positions.to(device, non_blocking=True)
        x, y = features.features[on_device], features.targets[on_device]
        with amp():
            logits = head(x)
            loss = criterion(logits, y, positions) if getattr(criterion, "needs_rows", False) else criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        logits_all.append(logits.detach().float().cpu())
        targets_all.append(y.cpu())
        index_all.append(positions)
    return collect(total, count, logits_all, targets_all, index_all)


@torch.inference_mode()
def predict_head(head: nn.Module, features: FeatureSet, batches: Iterable[list[int]], amp: Callable,
                 criterion: nn.Module | None = None) -> EpochOutput:
    """Logits of ``head`` for the cached features, in the order of ``batches`` (plus the mean loss)."""
    total, count, logits_all, targets_all, index_all = 0.0, 0, [], [], []
    device = features.features.device
    for batch in batches:
        positions = torch.as_tensor(batch, dtype=torch.long)
        on_device = positions.to(device, non_blocking=True)
        x, y = features.features[on_device], features.targets[on_device]
        with amp():
            logits = head(x).float()
        if criterion is not None:
            total += criterion(logits, y).item() * len(y)
        count += len(y)
        logits_all.append(logits.cpu())
        targets_all.append(y.cpu())
        index_all.append(positions)
    return collect(total, count, logits_all, targets_all, index_all)
