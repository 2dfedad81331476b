"""Datasets of decoded X-rays as (1, S, S) tensors in [0, 1] plus class index.

:class:`XrayDataset` serves a ``DataLoader`` (per-sample transforms in worker processes); :class:`DeviceBatches`
keeps the prepared squares of a small dataset on the GPU and augments whole batches there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from covidxr.io import load_xray
from covidxr.preprocess import AUGMENT, letterbox


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


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).mul_(high - low).add_(low)


def augment_params(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw per-sample augmentation parameters on the CPU, so that a seed gives the same batch on every device.

    Returns float64 tensors of length ``n``: crop width/height and centre (as fractions of the source side),
    rotation (radians), translation (fractions of the output side), brightness and contrast factors.
    """
    r = AUGMENT
    area = _uniform(n, *r.crop_scale, generator)
    log_ratio = _uniform(n, np.log(r.crop_ratio[0]), np.log(r.crop_ratio[1]), generator)
    width = (area * log_ratio.exp()).sqrt().clamp_(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp_(max=1.0)
    return {
        "width": width,
        "height": height,
        "cx": 0.5 * width + torch.rand(n, generator=generator, dtype=torch.float64) * (1 - width),
        "cy": 0.5 * height + torch.rand(n, generator=generator, dtype=torch.float64) * (1 - height),
        "angle": _uniform(n, -r.degrees, r.degrees, generator).deg2rad_(),
        "tx": _uniform(n, -r.translate, r.translate, generator),
        "ty": _uniform(n, -r.translate, r.translate, generator),
        "brightness": _uniform(n, 1 - r.brightness, 1 + r.brightness, generator),
        "contrast": _uniform(n, 1 - r.contrast, 1 + r.contrast, generator),
    }


def affine_matrices(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return (n, 2, 3) ``affine_grid`` matrices: output coordinates -> source coordinates, both in [-1, 1].

    One matrix does the random resized crop, the rotation about the centre and the shift together, so each
    output pixel is interpolated once.
    """
    cos, sin = params["angle"].cos(), params["angle"].sin()
    # Inverse rotation applied after removing the shift, then scaled into the crop box.
    rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (n, 2, 2)
    scale = torch.diag_embed(torch.stack([params["width"], params["height"]], -1))
    linear = scale @ rot_inv
    shift = torch.stack([params["tx"], params["ty"]], -1).mul(2.0).unsqueeze(-1)  # to [-1, 1] units
    centre = torch.stack([params["cx"], params["cy"]], -1).mul(2.0).sub(1.0).unsqueeze(-1)
    return torch.cat([linear, centre - linear @ shift], -1)


def augment_batch(squares: torch.Tensor, img_size: int, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a batch: (B, 1, S', S') floats in [0, 1] -> (B, 1, img_size, img_size) in [0, 1].

    Per sample: random resized crop, rotation, shift, then brightness and contrast factors, with the ranges of
    ``covidxr.preprocess.AUGMENT`` -- the augmentation of ``train_transform``, batched
    (crop sides are clipped to the image instead of re-drawn, and brightness always precedes contrast). Runs
    on the device of ``squares``; the parameters come from ``generator`` (a CPU generator).
    """
    n = squares.shape[0]
    params = augment_params(n, generator)
    theta = affine_matrices(params).to(device=squares.device, dtype=squares.dtype)
    grid = F.affine_grid(theta, [n, 1, img_size, img_size], align_corners=False)
    out = F.grid_sample(squares, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    factor = params["brightness"].to(device=squares.device, dtype=squares.dtype).view(n, 1, 1, 1)
    out = out.mul_(factor).clamp_(0.0, 1.0)
    contrast = params["contrast"].to(device=squares.device, dtype=squares.dtype).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return out.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0.0, 1.0)


def resize_batch(squares: torch.Tensor, img_size: int) -> torch.Tensor:
    """The evaluation transform, batched: antialiased bilinear resize to (img_size, img_size)."""
    if squares.shape[-1] == img_size and squares.shape[-2] == img_size:
        return squares
    return F.interpolate(squares, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)


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
    """

    def __init__(self, images: torch.Tensor, rows: Sequence[int], targets: Sequence[int],
                 batches: Iterable[list[int]], img_size: int, augment_seed: int | None) -> None:
        self.images = images
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=images.device)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long, device=images.device)
        self.batches = batches
        self.img_size = img_size
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        generator = None if self.augment_seed is None else torch.Generator().manual_seed(self.augment_seed)
        for batch in self.batches:
            positions = torch.as_tensor(batch, dtype=torch.long)
            on_device = positions.to(self.images.device, non_blocking=True)
            squares = self.images[self.rows[on_device]].unsqueeze(1).float().div_(255.0)
            if generator is None:
                images = resize_batch(squares, self.img_size)
            else:
                images = augment_batch(squares, self.img_size, generator)
            yield images, self.targets[on_device], positions
