"""Explanations on the original image: mapping a CAM back onto it (:func:`heatmap_on_image`) and drawing it
(:func:`overlay`, with any matplotlib colour map).

CAMs (:mod:`covidxr.explain.cam`) are computed on the letterboxed network input and mapped back onto the original
``(H, W)`` image with :func:`covidxr.preprocess.unletterbox` (the padding is cropped away, then bilinear resizing).
Values stay on pytorch-grad-cam's scale (min-max over the whole network input, so the maximum inside the image can
be below 1). A heatmap that is not finite or constant over the image gives no heatmap and a note
``"no explanation available (...)"``; it is never drawn as a uniformly hot picture.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image

from covidxr.preprocess import unletterbox

CONSTANT_TOLERANCE: float = 1e-6
"""A heatmap whose values span less than this is constant (no explanation)."""

NO_EXPLANATION = "no explanation available ({})"


def heatmap_on_image(cam_map: np.ndarray, height: int, width: int) -> tuple[np.ndarray | None, str | None]:
    """Map a CAM computed on the letterboxed input back onto the original image.

    Args:
        cam_map: ``(S, S)`` heatmap on the network input.
        height: original image height.
        width: original image width.

    Returns:
        ``(heatmap, None)`` with an ``(height, width)`` float32 heatmap in ``[0, 1]``, or ``(None, note)`` when the
        map is not finite or constant over the image.
    """
    cam_map = np.asarray(cam_map, dtype=np.float32)
    if not np.isfinite(cam_map).all():
        return None, NO_EXPLANATION.format("the heatmap is not finite")
    if float(np.ptp(cam_map)) < CONSTANT_TOLERANCE:
        return None, NO_EXPLANATION.format("constant heatmap")
    heat = np.clip(unletterbox(cam_map, height, width), 0.0, 1.0).astype(np.float32)
    if float(np.ptp(heat)) < CONSTANT_TOLERANCE:
        return None, NO_EXPLANATION.format("the heatmap is constant over the image")
    return heat, None


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


def overlay(image: np.ndarray, heatmap: np.ndarray | None, alpha: float = 0.4, max_side: int = 1024,
            colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap onto the grey X-ray, for display.

    Args:
        image: ``(H, W)`` float image in ``[0, 1]`` (uint8 is read as value/255).
        heatmap: ``(H, W)`` heatmap in ``[0, 1]``, or None for the plain grey image.
        alpha: weight of the colour map (0: only the X-ray, 1: only the colour map).
        max_side: longest side of the result; larger images are scaled down, aspect ratio kept.
        colormap: a matplotlib colormap name (``"jet"``, ``"inferno"``, ...).

    Returns:
        ``(h, w, 3)`` uint8 RGB picture.

    Raises:
        ValueError: when the shapes differ, the image is not 2-D or ``alpha``/``max_side`` are out of range.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0 or max_side < 1:
        raise ValueError(f"alpha must be in [0, 1] and max_side >= 1, got {alpha}, {max_side}")
    grey = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    height, width = display_size(*image.shape, max_side)
    rgb = np.repeat(np.clip(_resize(grey, (width, height)), 0.0, 1.0)[..., None], 3, axis=2)
    if heatmap is not None:
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != image.shape:
            raise ValueError(f"heatmap shape {heatmap.shape} differs from image shape {image.shape}")
        heat = np.clip(np.nan_to_num(_resize(heatmap, (width, height))), 0.0, 1.0)
        colour = matplotlib.colormaps[colormap](heat)[..., :3]
        rgb = (1.0 - alpha) * rgb + alpha * colour
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
