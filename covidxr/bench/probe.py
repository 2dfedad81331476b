"""A head-only epoch: augmented images through the frozen backbone vs the feature cache (``--linear-probe``)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from covidxr.bench.common import Measure, amp_context, bench_model, cached_images, peaks, real_subset, timed
from covidxr.data.dataset import XrayDataset
from covidxr.preprocessing.transforms import cache_size, eval_transform, train_transform
from covidxr.training import engine
from covidxr.training import head_features as features


def measure_probe(args: argparse.Namespace, device: torch.device, variant: str) -> Measure:
    """Seconds of one head-only epoch over ``--images`` real images."""
    paths, targets = real_subset(args)
    model = bench_model(args, device)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp, criterion = amp_context(device, device.type == "cuda"), nn.CrossEntropyLoss()
    images = cached_images(args, paths)
    fast = device.type == "cuda"
    extra = {}
    if variant == "network":
        ds = XrayDataset(paths, targets, cache_size(args.img_size), train_transform(args.img_size), images)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(0))
        (seconds,) = timed(lambda: engine.train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler,
                                                          device, amp, channels_last=fast, frozen_backbone=True,
                                                          progress=False), device)
        how = "augmented images through the frozen backbone"
    else:
        ds = XrayDataset(paths, targets, cache_size(args.img_size), eval_transform(args.img_size), images)
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
        start = time.perf_counter()
        feats = features.assemble(*features.extract_features(model, loader, device, amp, progress=False), len(ds))
        extra["extract_seconds"] = time.perf_counter() - start
        batches = BatchSampler(RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)),
                               args.batch_size, drop_last=False)
        seconds = float(np.median(timed(lambda: features.train_head_epoch(model.head, feats, batches, criterion,
                                                                          optimizer, scheduler, scaler, amp,
                                                                          progress=False),
                                        device, max(5, args.repeats))))
        how = "head on cached features (--linear-probe)"
    rss, gpu = peaks(device)
    return Measure(seconds, how, rss, gpu, extra)
