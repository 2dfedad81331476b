"""Explanations on the original image: mapping a CAM back onto it (:func:`heatmap_on_image`), drawing it
(:func:`overlay`, with any matplotlib colour map) and labelling the picture for download (:func:`captioned`: a colour
bar and caption lines in a margin below it).

The overlay leaves low CAM values transparent: each pixel's opacity grows with its CAM value from 0 at
:data:`HEAT_THRESHOLD` to ``alpha`` at 1, so the film is not tinted all over and the colour marks only the regions
that mattered. :func:`colour_stops` gives the same scale for a legend drawn elsewhere (the app's HTML colour bar).

CAMs (:mod:`covidxr.model.cam`) are computed on the letterboxed network input and mapped back onto the original
``(H, W)`` image with :func:`covidxr.preprocessing.transforms.unletterbox` (the padding is cropped away, then bilinear
resizing). Values stay on pytorch-grad-cam's scale (min-max over the whole network input, so the maximum inside the
image can
be below 1). A heatmap that is not finite or constant over the image gives no heatmap and a note
``"no explanation available (...)"``; it is never drawn as a uniformly hot picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covidxr.model.cam import CONSTANT_TOLERANCE, NO_EXPLANATION, heatmap_on_image  # noqa: F401 - re-exported

HEAT_THRESHOLD: float = 0.2
"""CAM values up to this are not drawn; above it the colour's opacity rises linearly to ``alpha`` at 1."""

DEFAULT_COLORMAP = "jet"


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W) array to ``size`` = (width, height) with PIL's antialiased bilinear filter.

    Returns:
        The resized float32 array (the input itself when the size already matches).
    """
    if (array.shape[1], array.shape[0]) == size:
        return array.astype(np.float32, copy=False)
    resized = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F").resize(size, Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Return the (height, width) an image is shown at: its own size, scaled down to ``max_side`` if larger.

    Args:
        height: image height.
        width: image width.
        max_side: the longest side allowed.

    Returns:
        ``(height, width)``, aspect ratio kept.
    """
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """An (H, W) float image or heat map at the size :func:`overlay` draws it (:func:`display_size`), resized as
    :func:`overlay` resizes it: ``overlay(shrink(image, s), shrink(heat, s), max_side=s)`` is the same picture as
    ``overlay(image, heat, max_side=s)``, so a page that draws a large film several times resizes it once.

    Returns:
        float32 ``(h, w)`` (uint8 input read as value/255).
    """
    array = np.asarray(array)
    values = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    height, width = display_size(*array.shape, max_side)
    return _resize(values, (width, height))


def heat_opacity(heat: np.ndarray, alpha: float, threshold: float = HEAT_THRESHOLD) -> np.ndarray:
    """Per-pixel opacity of the colour map: 0 up to ``threshold``, rising linearly to ``alpha`` at a CAM value of 1.

    Args:
        heat: CAM values in ``[0, 1]``.
        alpha: opacity at the highest value.
        threshold: the value below which nothing is drawn, in ``[0, 1)``.

    Returns:
        Float32 array of ``heat``'s shape in ``[0, alpha]``.
    """
    ramp = (np.asarray(heat, dtype=np.float32) - threshold) / max(1.0 - threshold, 1e-6)
    return (alpha * np.clip(ramp, 0.0, 1.0)).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray | None, alpha: float = 0.4, max_side: int = 1024,
            colormap: str = DEFAULT_COLORMAP, threshold: float = HEAT_THRESHOLD) -> np.ndarray:
    """Blend a colour-mapped heatmap onto the grey X-ray, for display; low values stay transparent.

    Args:
        image: ``(H, W)`` float image in ``[0, 1]`` (uint8 is read as value/255).
        heatmap: ``(H, W)`` heatmap in ``[0, 1]``, or None for the plain grey image.
        alpha: opacity of the colour at the highest CAM value (0: only the X-ray, 1: only the colour map there).
        max_side: longest side of the result; larger images are scaled down, aspect ratio kept.
        colormap: a matplotlib colormap name (``"jet"``, ``"inferno"``, ...).
        threshold: CAM values up to this are not drawn (see :func:`heat_opacity`).

    Returns:
        ``(h, w, 3)`` uint8 RGB picture.

    Raises:
        ValueError: when the shapes differ, the image is not 2-D or ``alpha``/``max_side``/``threshold`` are out of
            range.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0 or max_side < 1 or not 0.0 <= threshold < 1.0:
        raise ValueError(f"alpha must be in [0, 1], max_side >= 1 and threshold in [0, 1), got {alpha}, {max_side}, "
                         f"{threshold}")
    grey = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    height, width = display_size(*image.shape, max_side)
    rgb = np.repeat(np.clip(_resize(grey, (width, height)), 0.0, 1.0)[..., None], 3, axis=2)
    if heatmap is not None:
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != image.shape:
            raise ValueError(f"heatmap shape {heatmap.shape} differs from image shape {image.shape}")
        heat = np.clip(np.nan_to_num(_resize(heatmap, (width, height))), 0.0, 1.0)
        colour = matplotlib.colormaps[colormap](heat)[..., :3]
        weight = heat_opacity(heat, alpha, threshold)[..., None]
        rgb = (1.0 - weight) * rgb + weight * colour
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def colour_stops(colormap: str = DEFAULT_COLORMAP, count: int = 11) -> list[str]:
    """``count`` evenly spaced colours of a colour map from 0 to 1, as ``#rrggbb`` (for a legend drawn in HTML)."""
    cmap = matplotlib.colormaps[colormap]
    return ["#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in cmap(v)[:3]))
            for v in np.linspace(0.0, 1.0, max(2, count))]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colour_bar(width: int, colormap: str = DEFAULT_COLORMAP, threshold: float = HEAT_THRESHOLD,
               label: str = "CAM value") -> np.ndarray:
    """A horizontal colour bar with its scale, as drawn under a downloaded overlay.

    The part up to ``threshold`` is drawn grey and labelled "not drawn": those values leave the film untinted.

    Args:
        width: picture width in pixels.
        colormap: the overlay's colour map.
        threshold: the overlay's threshold.
        label: what the colours measure.

    Returns:
        ``(h, width, 3)`` uint8 RGB picture on white.
    """
    size = max(11, min(18, width // 45))
    pad, bar_h = size, size + 4
    left, right = pad, max(pad + 2, width - pad)
    canvas = Image.new("RGB", (width, bar_h + 3 * size + pad), "white")
    values = np.linspace(0.0, 1.0, right - left, dtype=np.float32)
    colours = np.rint(matplotlib.colormaps[colormap](values)[:, :3] * 255).astype(np.uint8)
    colours[values <= threshold] = 200
    canvas.paste(Image.fromarray(np.repeat(colours[None], bar_h, axis=0)), (left, pad // 2))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, pad // 2, right - 1, pad // 2 + bar_h - 1), outline=(90, 90, 90))
    font, y = _font(size), pad // 2 + bar_h + 2
    cut = left + round(threshold * (right - left))
    draw.text((left, y), "0 (low)", fill="black", font=font)
    draw.text((right, y), "1 (high)", fill="black", font=font, anchor="ra")
    if threshold > 0:
        draw.line((cut, pad // 2, cut, pad // 2 + bar_h - 1), fill=(60, 60, 60))
    draw.text((left, y + size + 2), f"{label}; values up to {threshold:.1f} are not drawn", fill=(60, 60, 60),
              font=font)
    return np.asarray(canvas)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` pixels (at spaces; an over-long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned(picture: np.ndarray, lines: Sequence[str], colormap: str | None = DEFAULT_COLORMAP,
              threshold: float = HEAT_THRESHOLD) -> np.ndarray:
    """The picture with a white margin below it: the colour bar (unless ``colormap`` is None) and caption lines.

    Args:
        picture: ``(h, w, 3)`` uint8 RGB, e.g. from :func:`overlay`; it is copied unchanged into the top.
        lines: caption lines (class, probability, method, model, date, intended use); long lines are wrapped.
        colormap: the overlay's colour map, or None for no colour bar.
        threshold: the overlay's threshold.

    Returns:
        ``(h + margin, max(w, 320), 3)`` uint8 RGB.
    """
    picture = np.asarray(picture, dtype=np.uint8)
    width = max(picture.shape[1], 320)
    size = max(12, min(20, width // 40))
    font = _font(size)
    wrapped = [part for line in lines for part in _wrap(line, font, width - 2 * size)]
    bar = colour_bar(width, colormap, threshold) if colormap else np.zeros((0, width, 3), np.uint8)
    text_h = len(wrapped) * (size + 4) + size
    canvas = Image.new("RGB", (width, picture.shape[0] + bar.shape[0] + text_h), "white")
    canvas.paste(Image.fromarray(picture), (0, 0))
    if bar.shape[0]:
        canvas.paste(Image.fromarray(bar), (0, picture.shape[0]))
    draw = ImageDraw.Draw(canvas)
    y = picture.shape[0] + bar.shape[0] + size // 2
    for line in wrapped:
        draw.text((size, y), line, fill="black", font=font)
        y += size + 4
    return np.asarray(canvas)
