"""``torchrun`` support: process group, broadcasts, gathering of predictions and gradient averaging (the rank-aware
samplers are in :mod:`covidxr.data.loaders`).

A single process (no ``WORLD_SIZE`` in the environment, or 1) uses the same code with every collective a
no-op, so ``python -m covidxr.train`` and ``torchrun --nproc_per_node=N -m covidxr.train`` share one path.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from covidxr.networks.batches import EpochOutput

# Rank 0 decodes the whole dataset into the cache while the others wait at a barrier: allow for that.
DEFAULT_TIMEOUT_MIN = 120


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under ``torchrun`` with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True for the process that logs and writes files."""
        return self.rank == 0


def env_info(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as set by ``torchrun`` (defaults: a single process)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, Gloo otherwise) and return this process's device.

    Timeout: ``$COVIDXR_DIST_TIMEOUT_MIN`` minutes (default 120), long enough for rank 0 to fill the cache.
    """
    if not info.enabled:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    if not dist.is_initialized():
        minutes = float(os.environ.get("COVIDXR_DIST_TIMEOUT_MIN") or DEFAULT_TIMEOUT_MIN)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=minutes))
    return device


def cleanup(info: DistInfo) -> None:
    """Leave the process group (a no-op for a single process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every rank arrives."""
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Return rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: nn.Module, info: DistInfo, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank, in place."""
    if not info.enabled:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over ranks (what DDP does, for parameters trained outside it)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(info.world_size)


def gather_rows(rows: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's ``rows`` (first dimensions may differ) in rank order."""
    if not info.enabled:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(info.world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)])


def gather_epoch(out: EpochOutput, info: DistInfo, dedupe: bool) -> EpochOutput:
    """Return the predictions of all ranks together.

    Args:
        out: this rank's results.
        info: the job.
        dedupe: keep one row per dataset index; for evaluation, where ``DistributedSampler`` pads the last
            ranks with repeated samples. Training keeps every row: a weighted sampler draws with replacement,
            so a repeated index there is a real draw.

    The mean loss is the count-weighted mean of the ranks' losses (padding repeats included).
    """
    if not info.enabled:
        return out
    parts: list[EpochOutput | None] = [None] * info.world_size
    dist.all_gather_object(parts, out)
    parts = [p for p in parts if p is not None and len(p.targets)]
    if not parts:
        return out
    counts = np.array([len(p.targets) for p in parts], dtype=np.float64)
    loss = float(np.dot([p.loss for p in parts], counts) / counts.sum())
    logits = np.concatenate([p.logits for p in parts])
    targets = np.concatenate([p.targets for p in parts])
    indices = np.concatenate([p.indices for p in parts])
    if dedupe:
        _, first = np.unique(indices, return_index=True)
        logits, targets, indices = logits[first], targets[first], indices[first]
    return EpochOutput(loss=loss, logits=logits, targets=targets, indices=indices)
