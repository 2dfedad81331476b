"""Training img/s through the project's training loop: synthetic tensors, or real images through a project loader."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from covidxr.bench.common import Measure, amp_context, bench_model, cached_images, peaks, real_subset, timed
from covidxr.data.dataset import DeviceBatches, XrayDataset
from covidxr.preprocessing.transforms import cache_size, train_transform
from covidxr.training import engine

WARMUP_STEPS = 3  # untimed: cuDNN autotuning, allocator growth, loader start-up


def _train_batches(args: argparse.Namespace, device: torch.device, variant: str, total: int):
    """``total`` training batches for ``variant``: synthetic tensors, or real images through a project loader."""
    b = args.batch_size
    if variant in ("plain", "project"):
        x = torch.rand(b, 1, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 3, (b,), device=device)
        return [(x, y, torch.arange(b))] * total, "synthetic tensors"
    paths, targets = real_subset(args, args.loader_images or 10**9)
    images = cached_images(args, paths) if variant != "raw" else None
    # Drawn with replacement so that any number of steps fits a small dataset, every batch full.
    sampler = RandomSampler(range(len(paths)), replacement=True, num_samples=total * b,
                            generator=torch.Generator().manual_seed(0))
    if variant == "device":
        stacked = torch.from_numpy(np.stack(images)).to(device)
        loader = DeviceBatches(stacked, range(len(paths)), targets, BatchSampler(sampler, b, True), args.img_size,
                               augment_seed=0)
        return loader, f"--gpu-cache: {len(paths)} real images, batched augmentation on {device.type}"
    cached = variant == "workers"
    ds = XrayDataset(paths, targets, cache_size(args.img_size), train_transform(args.img_size),
                     images if cached else None)
    loader = DataLoader(ds, batch_size=b, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    source = "decode-once cache" if cached else "--no-cache: every image decoded on each use"
    return loader, f"{source}, {len(paths)} real images, augmentation in {args.workers} workers"


def measure_train(args: argparse.Namespace, device: torch.device, variant: str) -> Measure:
    """Training img/s through the project's training loop.

    ``plain``: fp32 NCHW on synthetic tensors (the notebook way). ``project``: AMP + channels_last on CUDA,
    synthetic tensors. ``device`` / ``workers`` / ``raw``: the project's settings fed by a real loader
    (``--gpu-cache``; the decode-once cache with augmentation in loader processes; or those processes decoding
    every image on each use, ``--no-cache``).
    """
    fast = variant != "plain" and device.type == "cuda"
    model = bench_model(args, device)
    if fast:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    amp = amp_context(device, fast)
    dtype = torch.float16 if fast and not torch.cuda.is_bf16_supported() else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches, source = _train_batches(args, device, variant, WARMUP_STEPS + args.steps)
    stream = iter(batches)

    def steps(n: int) -> None:
        engine.train_one_epoch(model, itertools.islice(stream, n), nn.CrossEntropyLoss(), optimizer, scheduler,
                               scaler, device, amp, channels_last=fast, progress=False)

    steps(WARMUP_STEPS)
    (seconds,) = timed(lambda: steps(args.steps), device)
    extra = {}
    if variant == "plain":
        with FlopCounterMode(display=False) as counter:
            engine.train_one_epoch(model, batches[:1], nn.CrossEntropyLoss(), optimizer, scheduler, scaler, device,
                                   amp, progress=False)
        extra["flops_per_image"] = counter.get_total_flops() / args.batch_size
    how = ("AMP + channels_last" if fast else "fp32, NCHW") + f", {source}"
    rss, gpu = peaks(device)
    return Measure(args.steps * args.batch_size / seconds, how, rss, gpu, extra)
