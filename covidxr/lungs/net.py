"""Segmentation networks for the lung model: a compact U-Net in plain torch, and a U-Net on EfficientNet-Lite0.

Both take (B, 1, S, S) grey images in [0, 1] (letterboxed, see :func:`covidxr.preprocessing.transforms.letterbox`) and
return (B, 1, S, S) lung logits. Each normalises its input inside ``forward``, so the checkpoint's ``arch`` record plus
the
state dict rebuild the whole model: nothing about the input lives outside the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidxr.networks.architectures import LITE0, WeightsError, build_model

UNET = "unet"
LITE0_UNET = "lite0-unet"
ARCHS = (UNET, LITE0_UNET)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class Decoder(nn.Module):
    """U-Net decoder: upsample (bilinear), concatenate the skip, convolve; from the deepest feature map up."""

    def __init__(self, deep: int, skips: list[int], widths: list[int]) -> None:
        super().__init__()
        blocks = []
        for skip, width in zip(skips, widths, strict=True):
            blocks.append(conv_block(deep + skip, width))
            deep = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block, skip in zip(self.blocks, skips, strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean and unit variance: films from other sites differ mostly in exposure and contrast."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-3)


class UNet(nn.Module):
    """A compact U-Net: ``depth`` max-pool stages with ``width * 2**level`` channels (about 1.1 M parameters at
    width 12, depth 4)."""

    def __init__(self, width: int = 12, depth: int = 4) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList([conv_block(1, widths[0])] +
                                      [conv_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.decoder = Decoder(widths[-1], widths[-2::-1], widths[-2::-1])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) in [0, 1] -> (B, 1, S, S) logits
        x = standardize(x)
        features = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            features.append(x)
        x = self.decoder(features[-1], features[-2::-1])
        return self.head(x)


class Lite0UNet(nn.Module):
    """A U-Net decoder on the EfficientNet-Lite0 encoder (strides 2 to 32), ImageNet weights when ``pretrained``.

    The grey input is repeated to RGB and scaled to [-1, 1], as the TF-ported Lite0 weights were trained.
    """

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model("efficientnet_lite0", features_only=True, pretrained=False)
        if pretrained:
            self.encoder.load_state_dict(lite0_encoder_weights(self.encoder))
        channels = self.encoder.feature_info.channels()  # [16, 24, 40, 112, 320]
        self.decoder = Decoder(channels[-1], channels[-2::-1], [64, 40, 24, 16])
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) in [0, 1] -> (B, 1, S, S) logits
        size = x.shape[-2:]
        features = self.encoder((x.expand(-1, 3, -1, -1) - 0.5) / 0.5)
        x = self.decoder(features[-1], features[-2::-1])
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


def lite0_encoder_weights(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet Lite0 weights (from the offline package, via :func:`covidxr.networks.architectures.build_model`)
    for the
    feature-extractor ``encoder``; the classifier's head convolution and its norm are dropped."""
    backbone = build_model(LITE0, 2, "imagenet").backbone.state_dict()
    wanted = encoder.state_dict()
    missing = sorted(set(wanted) - set(backbone))
    if missing:
        raise WeightsError(f"Lite0 ImageNet weights lack encoder tensors, e.g. {missing[0]}")
    return {key: backbone[key] for key in wanted}


def build_net(arch: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Build the network an ``arch`` record describes (``{"name": "unet", "width": 12, "depth": 4}`` or
    ``{"name": "lite0-unet"}``); ``pretrained`` loads ImageNet weights into the Lite0 encoder (training only: a
    checkpoint's state dict replaces them).

    Raises:
        ValueError: unknown architecture name or bad sizes.
    """
    name = arch.get("name")
    if name == UNET:
        width, depth = int(arch.get("width", 12)), int(arch.get("depth", 4))
        if width < 1 or not 1 <= depth <= 6:
            raise ValueError(f"bad U-Net size width={width} depth={depth}")
        return UNet(width, depth)
    if name == LITE0_UNET:
        return Lite0UNet(pretrained)
    raise ValueError(f"unknown lung network {name!r}; choose one of {', '.join(ARCHS)}")

