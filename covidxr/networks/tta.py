"""Test-time augmentation: a classifier's probabilities averaged over small, label-preserving views of each input.

The views are the geometric changes a film from another hospital brings (framing and a slight tilt): the network
input itself, zoomed in and out by :data:`ZOOM`, and rotated by :data:`ANGLE` degrees each way. No flips: the heart's
side is anatomy, not noise. :class:`TTAClassifier` returns ``log(mean_v softmax(logits_v))``, so a softmax of its
output is the mean probability and a temperature fitted on it applies as on any classifier's logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

ZOOM = 0.10
ANGLE = 5.0
# (rotation in degrees, scale) of each view; the first is the input as it is.
VIEWS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 1.0 + ZOOM), (0.0, 1.0 - ZOOM), (ANGLE, 1.0),
                                          (-ANGLE, 1.0))


def view(x: torch.Tensor, angle: float, scale: float) -> torch.Tensor:
    """``(B, 1, S, S)`` inputs rotated by ``angle`` degrees and scaled by ``scale`` about the centre (zero fill, the
    letterbox's background)."""
    if angle == 0.0 and scale == 1.0:
        return x
    return TF.affine(x, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                     interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)


class TTAClassifier(nn.Module):
    """``model`` evaluated on every view of :data:`VIEWS`, its probabilities averaged (log of the mean returned)."""

    def __init__(self, model: nn.Module, views: tuple[tuple[float, float], ...] = VIEWS) -> None:
        super().__init__()
        if not views:
            raise ValueError("test-time augmentation needs at least one view")
        self.model = model
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, C)`` log mean probabilities over the views."""
        log_probs = torch.stack([torch.log_softmax(self.model(view(x, angle, scale)).float(), dim=1)
                                 for angle, scale in self.views])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.views))
