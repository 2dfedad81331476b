"""Loader img/s over real images: a notebook-style loader that decodes with PIL every epoch, the decode-once cache
(with and without training augmentation), and the on-device batch pipeline (``--gpu-cache``)."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from covidxr.bench.common import Measure, cached_images, rate, real_subset, timed
from covidxr.data.dataset import DeviceBatches, XrayDataset
from covidxr.preprocessing.transforms import cache_size, eval_transform, train_transform


class NotebookDataset:
    """The plain way: ``ImageFolder``'s PIL loader (RGB), ``Resize`` and ``ToTensor`` on every access."""

    def __init__(self, paths: list[str], targets: list[int], img_size: int) -> None:
        self.paths, self.targets = paths, targets
        self.transform = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(default_loader(self.paths[index])), self.targets[index]


def measure_loader(args: argparse.Namespace, device: torch.device, variant: str) -> Measure:
    """One epoch of a shuffled loader over ``--images`` real images, batches only consumed."""
    paths, targets = real_subset(args, args.loader_images or 10**9)
    generator = torch.Generator().manual_seed(0)
    if variant == "raw":
        ds, how = NotebookDataset(paths, targets, args.img_size), "PIL decode + Resize + ToTensor each epoch"
    elif variant in ("cached", "augmented"):
        augment = variant == "augmented"
        transform = train_transform(args.img_size) if augment else eval_transform(args.img_size)
        ds = XrayDataset(paths, targets, cache_size(args.img_size), transform, cached_images(args, paths))
        how = "decode-once cache, " + ("training augmentation" if augment else "Resize")
    else:
        images = torch.from_numpy(np.stack(cached_images(args, paths))).to(device)
        batches = BatchSampler(RandomSampler(range(len(paths)), generator=generator), args.batch_size, False)
        loader = DeviceBatches(images, range(len(paths)), targets, batches, args.img_size, augment_seed=0)
        how = f"--gpu-cache: uint8 tensor on {device.type}, batched augmentation"
    if variant != "device":
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            pin_memory=device.type == "cuda", generator=generator)
        how += f", {args.workers} workers"

    def epoch() -> None:
        for images, *_ in loader:
            images.to(device, non_blocking=True)

    return rate(len(paths), timed(epoch, device, args.repeats), how, device)
