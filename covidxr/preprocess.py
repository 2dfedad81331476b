"""The one preprocessing definition: geometry (letterbox to a square), augmentations, and its record.

Pipeline: ``covidxr.io.load_xray`` gives an (H, W) float image in [0, 1]; :func:`letterbox` pads it to a
square with black borders (nothing of the chest is cropped) and resizes it; the model itself repeats the
grey channel and normalises with the mean/std of its pretrained weights (see ``covidxr.models``), so the
tensors handled here are always (1, S, S) floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Preprocess:
    """What turns a decoded X-ray into the network input; stored in every checkpoint.

    Attributes:
        img_size: side of the square network input, in pixels.
        mean: per-channel normalisation mean of the pretrained weights (applied inside the model).
        std: per-channel normalisation std of the pretrained weights (applied inside the model).
        geometry: how the image is made square; only "letterbox" (pad, then resize) exists.
    """

    img_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    geometry: str = "letterbox"

    def to_dict(self) -> dict:
        """Return a JSON/checkpoint-friendly dict."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Rebuild from :meth:`to_dict` output, ignoring unknown keys."""
        known = {k: d[k] for k in ("img_size", "mean", "std", "geometry") if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def cache_size(img_size: int) -> int:
    """Return the side at which images are cached: a little above the training size (256 for 224)."""
    return int(round(img_size * 256 / 224))


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Return (top, left, content_height, content_width) of an (H, W) image letterboxed into size x size."""
    scale = size / max(height, width)
    content_h = max(1, round(height * scale))
    content_w = max(1, round(width * scale))
    return (size - content_h) // 2, (size - content_w) // 2, content_h, content_w


def letterbox(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Return a (1, size, size) float tensor: ``image`` (H, W) scaled to fit, centred on black.

    uint8 input is read as value/255; float input is expected in [0, 1].
    """
    x = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else torch.as_tensor(image)
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    height, width = x.shape[-2:]
    top, left, ch, cw = letterbox_box(height, width, size)
    resized = F.interpolate(x.reshape(1, 1, height, width), size=(ch, cw), mode="bilinear", antialias=True,
                            align_corners=False).clamp_(0.0, 1.0)
    out = torch.zeros(1, size, size)
    out[:, top : top + ch, left : left + cw] = resized[0]
    return out


def unletterbox(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Map a (S, S) map computed on a letterboxed input back onto the original (height, width) image."""
    size = heatmap.shape[0]
    top, left, ch, cw = letterbox_box(height, width, size)
    crop = torch.as_tensor(np.ascontiguousarray(heatmap[top : top + ch, left : left + cw]), dtype=torch.float32)
    out = F.interpolate(crop[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def network_input(image: np.ndarray | torch.Tensor, img_size: int) -> torch.Tensor:
    """Return the (1, img_size, img_size) network input for a decoded image, as training and evaluation see it.

    Training and evaluation read images letterboxed at :func:`cache_size` (from the prepared cache) and resize them
    to ``img_size``; prediction takes the same two steps so that a model sees the same pixels everywhere.
    """
    return eval_transform(img_size)(letterbox(image, cache_size(img_size)))


@dataclass(frozen=True)
class AugmentRanges:
    """The ranges of the training augmentation, shared by the per-image transform (:func:`train_transform`) and
    the batched one (:func:`covidxr.data.dataset.augment_batch`)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)  # area of the random crop, as a share of the image
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # its aspect ratio
    degrees: float = 7.0  # rotation up to +/- this
    translate: float = 0.04  # shift up to +/- this share of the side
    brightness: float = 0.15  # factor in 1 +/- this
    contrast: float = 0.15  # factor in 1 +/- this


AUGMENT = AugmentRanges()


def train_transform(img_size: int, ranges: AugmentRanges = AUGMENT) -> Transform:
    """Return the training augmentation for (1, S, S) inputs: mild crops, rotations, shifts and contrast.

    Radiographs are not flipped: the heart's side is anatomy, and a mirrored chest is not a plausible input.
    """
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=ranges.crop_scale, ratio=ranges.crop_ratio, antialias=True),
        v2.RandomAffine(degrees=ranges.degrees, translate=(ranges.translate, ranges.translate)),
        v2.ColorJitter(brightness=ranges.brightness, contrast=ranges.contrast),
    ])


def eval_transform(img_size: int) -> Transform:
    """Return the evaluation transform for (1, S', S') inputs: a plain resize to the network size."""
    return v2.Resize((img_size, img_size), antialias=True)
