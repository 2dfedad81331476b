"""A torch Dataset over a manifest table: decoded X-rays as (1, S, S) tensors in [0, 1] plus class index."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from covidxr.io import load_xray
from covidxr.preprocess import letterbox


class XrayDataset(Dataset):
    """Images from ``paths`` (decoded on each access) or from prepared uint8 squares (decoded once).

    Args:
        paths: image files, one per sample.
        targets: class index per sample.
        base_size: side of the letterboxed square the transform receives.
        transform: maps a (1, base_size, base_size) float tensor to the network input.
        images: optional prepared uint8 (base_size, base_size) arrays, aligned with ``paths``; when given,
            files are not read again.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], base_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor],
                 images: Sequence[np.ndarray] | None = None) -> None:
        if images is not None and len(images) != len(paths):
            raise ValueError("images must align with paths")
        self.paths = list(paths)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.base_size = base_size
        self.transform = transform
        # One contiguous uint8 tensor: cheap to share with loader workers and to index.
        self.images = torch.from_numpy(np.stack(images)) if images is not None and len(images) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.images is not None:
            square = self.images[index].unsqueeze(0).float().div_(255.0)
        else:
            square = letterbox(load_xray(self.paths[index]).pixels, self.base_size)
        return self.transform(square), self.targets[index], index
