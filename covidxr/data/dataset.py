"""Datasets of decoded X-rays as (1, S, S) tensors in [0, 1] plus class index.

:class:`XrayDataset` serves a ``DataLoader`` (per-sample transforms in worker processes); :class:`DeviceBatches`
keeps the prepared squares of a small dataset on the GPU and augments whole batches there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from covidxr.images.reader import load_xray
from covidxr.model.input_pipeline import PLAIN, InputPipeline
from covidxr.preprocessing.style_augment import StyleRanges
from covidxr.preprocessing.transforms import augment_batch, eval_transform


class XrayDataset(Dataset):
    """Images from ``paths`` (decoded on each access) or from prepared uint8 squares (decoded once).

    Args:
        paths: image files, one per sample.
        targets: class index per sample.
        base_size: side of the letterboxed square the transform receives.
        transform: maps a (1, base_size, base_size) float tensor to the network input, and a
            (B, 1, base_size, base_size) batch to a batch of them.
        images: optional prepared uint8 (base_size, base_size) arrays, aligned with ``paths``; when given,
            files are not read again. They are kept as given, not stacked into one copy: the caller's arrays
            (2 GB for 30,000 images at 256 px) are the only ones in memory, and forked loader workers share them.
        pipeline: how files are prepared when ``images`` is not given (lung crop, equalisation, letterbox; the
            same that prepared ``images``).
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], base_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor],
                 images: Sequence[np.ndarray] | None = None, pipeline: InputPipeline = PLAIN) -> None:
        if images is not None and len(images) != len(paths):
            raise ValueError("images must align with paths")
        self.paths = list(paths)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.base_size = base_size
        self.transform = transform
        self.pipeline = pipeline
        self.images = list(images) if images is not None and len(images) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.images is not None:
            square = torch.tensor(self.images[index]).unsqueeze(0).float().div_(255.0)
        else:
            prepared = self.pipeline.prepare(load_xray(self.paths[index]).pixels, self.base_size)
            square = torch.from_numpy(prepared.square).float().div_(255.0)[None]
        return self.transform(square), self.targets[index], index

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The samples at ``indices``; from prepared images, transformed as one batch (``DataLoader`` calls this
        with a whole batch, in its worker processes)."""
        if self.images is None:
            return [self[i] for i in indices]
        batch = np.stack([self.images[i] for i in indices])  # one small copy per batch, not one of the dataset
        squares = torch.from_numpy(batch).unsqueeze(1).float().div_(255.0)
        out = self.transform(squares)
        return [(out[k], self.targets[i], i) for k, i in enumerate(indices)]


class DeviceBatches:
    """Batches cut from one uint8 (N, S', S') tensor that already lives on the compute device.

    Nothing is decoded, copied from the host or augmented per sample: each batch is one gather, one
    ``grid_sample`` (training) or one resize (evaluation). Yields ``(images, targets, indices)`` like a
    ``DataLoader`` over :class:`XrayDataset`, with ``indices`` into the split.

    Args:
        images: (N, S', S') uint8 squares of the whole table, on the device.
        rows: table rows of this split (position i of the split is ``images[rows[i]]``).
        targets: class index per split sample.
        batches: batches of split positions (a ``BatchSampler``), iterated once per pass.
        img_size: network input side.
        augment_seed: seeds the augmentation generator; None evaluates (resize only).
        style: the scanner-style augmentation that follows the standard one (``--augment style``); None: none.
    """

    def __init__(self, images: torch.Tensor, rows: Sequence[int], targets: Sequence[int],
                 batches: Iterable[list[int]], img_size: int, augment_seed: int | None,
                 style: StyleRanges | None = None) -> None:
        self.images = images
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=images.device)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long, device=images.device)
        self.batches = batches
        self.img_size = img_size
        self.augment_seed = augment_seed
        self.style = style
        self.resize = eval_transform(img_size)  # the evaluation transform, which takes whole batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        generator = None if self.augment_seed is None else torch.Generator().manual_seed(self.augment_seed)
        for batch in self.batches:
            positions = torch.as_tensor(batch, dtype=torch.long)
            on_device = positions.to(self.images.device, non_blocking=True)
            squares = self.images[self.rows[on_device]].unsqueeze(1).float().div_(255.0)
            if generator is None:
                images = self.resize(squares)
            else:
                images = augment_batch(squares, self.img_size, generator, style=self.style)
            yield images, self.targets[on_device], positions
