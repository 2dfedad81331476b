"""The "scanner style" training augmentation (``--augment style``): random gamma, blur or sharpening, resolution loss
and noise, so that a network cannot tell hospitals apart by how their images were processed.

Public chest X-ray sets are confounded by source, and every source has its own processing chain (contrast curve,
edge enhancement, detector resolution and JPEG softness, noise). Randomising these cues per sample, on top of the
geometric and brightness/contrast augmentation of :func:`covidxr.preprocessing.transforms.augment_batch`, takes them
away as a shortcut. It is augmentation only: evaluation and prediction never apply it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENT_MODES = ("standard", "style")  # --augment: the standard augmentation alone, or followed by the style one


@dataclass(frozen=True)
class StyleRanges:
    """The ranges of the style augmentation (:func:`apply_style`); each step is applied to a sample independently,
    with probability ``probability``, in the order below."""

    probability: float = 0.5  # chance of each step, per sample
    gamma: tuple[float, float] = (0.7, 1.4)  # exponent of the intensity curve, log-uniform (above 1 darkens)
    sharpen_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian sigma of the unsharp mask, in output pixels
    sharpen_amount: tuple[float, float] = (-0.6, 1.0)  # x + amount * (x - blur(x)): below 0 blurs, above sharpens
    resample: tuple[float, float] = (0.4, 1.0)  # side factor of a down-and-up resample (bilinear, antialiased)
    noise: tuple[float, float] = (0.0, 0.03)  # standard deviation of additive Gaussian noise


STYLE = StyleRanges()


def style_ranges(mode: str) -> StyleRanges | None:
    """The style ranges of an ``--augment`` mode: None for "standard", :data:`STYLE` for "style".

    Raises:
        ValueError: ``mode`` is not one of :data:`AUGMENT_MODES`.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENT_MODES)}")
    return STYLE if mode == "style" else None


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).mul_(high - low).add_(low)


def _chance(n: int, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < probability


def style_params(n: int, generator: torch.Generator | None = None,
                 ranges: StyleRanges = STYLE) -> dict[str, torch.Tensor]:
    """Draw per-sample style parameters on the CPU, so that a seed gives the same batch on every device.

    ``generator`` None draws from torch's default generator. Every value is drawn for every sample whether its step
    applies or not, so the number of draws is fixed. A step that does not apply gets its neutral value.

    Returns float64 tensors of length ``n``: ``gamma`` (1: none), ``sigma`` and ``amount`` of the unsharp mask
    (amount 0: none), ``resample`` factor (1: none) and ``noise`` standard deviation (0: none).
    """
    r = ranges
    on = _chance(n, r.probability, generator)
    gamma = torch.where(on, _uniform(n, math.log(r.gamma[0]), math.log(r.gamma[1]), generator).exp_(), 1.0)
    on = _chance(n, r.probability, generator)
    sigma = _uniform(n, *r.sharpen_sigma, generator)
    amount = torch.where(on, _uniform(n, *r.sharpen_amount, generator), 0.0)
    on = _chance(n, r.probability, generator)
    resample = torch.where(on, _uniform(n, *r.resample, generator), 1.0)
    on = _chance(n, r.probability, generator)
    noise = torch.where(on, _uniform(n, *r.noise, generator), 0.0)
    return {"gamma": gamma, "sigma": sigma, "amount": amount, "resample": resample, "noise": noise}


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each (C, H, W) image of a batch with its own Gaussian ``sigma`` (pixels), truncated at ``radius``."""
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    s = sigma.to(device=images.device, dtype=images.dtype).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, 2 * radius + 1)
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def apply_style(images: torch.Tensor, generator: torch.Generator | None = None,
                ranges: StyleRanges = STYLE) -> torch.Tensor:
    """The style augmentation of a (B, C, H, W) batch in [0, 1]: a batch of the same shape, in [0, 1].

    Per sample (see :class:`StyleRanges`): a gamma curve, an unsharp mask that blurs or sharpens, a down-and-up
    resample, and Gaussian noise. Runs on the device of ``images``; the parameters and the noise come from
    ``generator`` (a CPU generator; None: torch's default one), drawn after those of the standard augmentation.
    """
    n, c, h, w = images.shape
    params = style_params(n, generator, ranges)
    out = images.clamp(0.0, 1.0)

    def subset(mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask).flatten()

    if len(idx := subset(params["gamma"] != 1.0)):
        gamma = params["gamma"][idx].to(device=out.device, dtype=out.dtype).view(-1, 1, 1, 1)
        at = idx.to(out.device)
        out[at] = out[at].pow(gamma)
    if len(idx := subset(params["amount"] != 0.0)):
        at = idx.to(out.device)
        amount = params["amount"][idx].to(device=out.device, dtype=out.dtype).view(-1, 1, 1, 1)
        radius = max(1, math.ceil(3 * ranges.sharpen_sigma[1]))
        x = out[at]
        out[at] = x.add(amount * (x - gaussian_blur(x, params["sigma"][idx], radius))).clamp_(0.0, 1.0)
    sizes = [(max(1, round(h * f)), max(1, round(w * f))) for f in params["resample"].tolist()]
    for size in sorted(set(sizes) - {(h, w)}):
        at = torch.tensor([i for i, s in enumerate(sizes) if s == size], device=out.device)
        small = F.interpolate(out[at], size=size, mode="bilinear", antialias=True, align_corners=False)
        out[at] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if len(idx := subset(params["noise"] > 0.0)):
        noise = torch.randn((len(idx), c, h, w), generator=generator, dtype=torch.float32)
        std = params["noise"][idx].view(-1, 1, 1, 1).float()
        at = idx.to(out.device)
        out[at] = out[at] + (noise * std).to(device=out.device, dtype=out.dtype)
    return out.clamp_(0.0, 1.0)
