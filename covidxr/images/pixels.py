"""What the raster reader (:mod:`covidxr.images.reader`) and the DICOM decoder (:mod:`covidxr.images.dicom`) share.

The grey-level conventions (colour to luminance, when an image counts as colour, the final float image) and the
one-line :class:`~covidxr.errors.ImageReadError` both decoders raise. Reading files is
:func:`covidxr.images.reader.load_xray`.
"""

from __future__ import annotations

import re

import numpy as np

from covidxr.errors import ImageReadError

COLOR_MIN_SPREAD: float = 32 / 255
"""A pixel is coloured when max(channel) - min(channel) exceeds this fraction of the full range."""

COLOR_MIN_FRACTION: float = 0.05
"""An image is colour when at least this fraction of its pixels is coloured."""

LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601-2 weights of red, green and blue, as PIL's ``convert("L")`` uses them."""

_MAX_MESSAGE = 300


def clean_text(text: str) -> str:
    """Return ``text`` on one line (whitespace and control characters collapsed), cut to a reasonable length."""
    line = re.sub(r"[\s\x00-\x1f\x7f]+", " ", str(text)).strip()
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 3] + "..."
    return line or "<unnamed>"


def read_error(name: str, reason: str) -> ImageReadError:
    """Return the project's one-line read error, ``"NAME: reason"``."""
    return ImageReadError(f"{clean_text(name)}: {clean_text(reason)}")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Return the float32 ``(H, W)`` luma of an ``(H, W, 3)`` array, in the input's units."""
    out = rgb[..., 0].astype(np.float32) * np.float32(LUMA[0])
    out += rgb[..., 1].astype(np.float32) * np.float32(LUMA[1])  # one channel at a time keeps the peak memory low
    out += rgb[..., 2].astype(np.float32) * np.float32(LUMA[2])
    return out


def is_color(rgb: np.ndarray, full_scale: float) -> bool:
    """Whether the channels of an ``(H, W, 3)`` array differ materially (see :data:`COLOR_MIN_SPREAD` and
    :data:`COLOR_MIN_FRACTION`); ``full_scale`` is the value of full intensity (255 for 8-bit)."""
    if rgb.size == 0:
        return False
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    if np.issubdtype(high.dtype, np.unsignedinteger):
        spread = high - low  # cannot wrap: high >= low
    else:
        spread = high.astype(np.float64) - low
    coloured = np.count_nonzero(spread > COLOR_MIN_SPREAD * full_scale)
    return bool(coloured >= COLOR_MIN_FRACTION * spread.size)


def unit_image(pixels: np.ndarray) -> np.ndarray:
    """Return the final image: float32, finite, clipped to ``[0, 1]`` and contiguous."""
    out = np.nan_to_num(np.asarray(pixels, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
