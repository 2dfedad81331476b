"""What the rest of covidxr does with a lung mask: the lung bounding box, a crop to it, the mask widened by a
margin, and the share of a Grad-CAM map that falls on the lungs. Plain NumPy/SciPy/OpenCV on (H, W) arrays; no model
needed (see :mod:`covidxr.lungs.model`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import cv2
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

MIN_LUNG_SHARE = 0.05
"""A mask covering less of the image than this is not a pair of lungs (lung_box falls back)."""

MAX_LUNG_SHARE = 0.80
"""A mask covering more of the image than this is not a pair of lungs either."""

MIN_WIDTH_TO_HEIGHT = 0.7
"""A box narrower than this times its height holds one lung only, and cropping to it would cut the other one off.
On the 175 training masks the box of both lungs has width/height 0.89 to 1.66 and a single lung's 0.37 to 0.90
(median 0.54); on the predicted masks of the other sources, two-lung boxes went down to 0.75 (tall NIH lungs) and
one-lung boxes up to 0.62."""

SECOND_LUNG_MIN = 0.1
"""The second-largest component counts as the other lung only when it has at least this share of the largest's area
(smaller ones are specks, and would stretch the box)."""


class LungBox(NamedTuple):
    """A box in pixel rows and columns of the image: ``image[top:bottom, left:right]`` (bottom and right exclusive).

    ``fell_back`` is True when the mask did not look like lungs and the box is the whole image.
    """

    top: int
    left: int
    bottom: int
    right: int
    fell_back: bool

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index an (H, W) array with ``image[box.slices]``."""
        return slice(self.top, self.bottom), slice(self.left, self.right)


class MasksImages(Protocol):
    """Anything with ``mask(image) -> (H, W) bool`` (a :class:`covidxr.lungs.LungModel`)."""

    def mask(self, image: np.ndarray) -> np.ndarray: ...


def lung_box(mask: np.ndarray, margin: float = 0.05, min_share: float = MIN_LUNG_SHARE,
             max_share: float = MAX_LUNG_SHARE) -> LungBox:
    """Return the bounding box of the two lungs in ``mask``, widened by ``margin``, or the whole image on fall-back.

    The lungs are the two largest connected components (the second only when it has at least
    :data:`SECOND_LUNG_MIN` of the largest's area). The box falls back to the whole image (``fell_back`` True) when
    the mask is implausible: lungs covering less than ``min_share`` or more than ``max_share`` of the image, or a
    box narrower than :data:`MIN_WIDTH_TO_HEIGHT` times its height (one lung only).

    Args:
        mask: (H, W) boolean lung mask (anything nonzero counts as lung).
        margin: added on each side, as a share of the image's height (top, bottom) and width (left, right); the box
            is clipped to the image.
        min_share: smallest plausible lung area, as a share of the image.
        max_share: largest plausible lung area, as a share of the image.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"lung_box needs a non-empty (H, W) mask, got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    height, width = mask.shape
    whole = LungBox(0, 0, height, width, True)
    lungs = _lungs(mask)
    share = lungs.sum() / mask.size
    if not min_share <= share <= max_share:
        return whole
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if right - left < MIN_WIDTH_TO_HEIGHT * (bottom - top):
        return whole
    dy, dx = round(margin * height), round(margin * width)
    return LungBox(max(0, top - dy), max(0, left - dx), min(height, bottom + dy), min(width, right + dx), False)


def _lungs(mask: np.ndarray) -> np.ndarray:
    """The largest component and, when big enough to be the other lung, the second largest."""
    labels, n = scipy.ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= SECOND_LUNG_MIN * sizes[order[0]]:
        keep.append(order[1] + 1)
    return np.isin(labels, keep)


def crop_to_lungs(image: np.ndarray, model_or_mask: MasksImages | np.ndarray,
                  margin: float = 0.05) -> tuple[np.ndarray, LungBox]:
    """Return ``image`` cropped to its lungs (see :func:`lung_box`) and the box used.

    Args:
        image: (H, W) image (e.g. ``covidxr.images.reader.load_xray(...).pixels``).
        model_or_mask: a :class:`covidxr.lungs.LungModel` (the mask is predicted) or an (H, W) mask of the image.
        margin: see :func:`lung_box`.

    Returns:
        ``(crop, box)``: a view ``image[box.slices]`` and the box; on fall-back the crop is the whole image.
    """
    image = np.asarray(image)
    mask = model_or_mask.mask(image) if hasattr(model_or_mask, "mask") else np.asarray(model_or_mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape[:2]}")
    box = lung_box(mask, margin)
    return image[box.slices], box


def dilate_mask(mask: np.ndarray, share: float) -> np.ndarray:
    """Return the (H, W) bool ``mask`` widened by ``share`` of its longer side: every pixel within that distance of
    the mask (a disc; a radius under half a pixel leaves the mask as it is).

    Raises:
        ValueError: a negative ``share`` or an array that is not 2-D.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"dilate_mask needs an (H, W) mask, got shape {mask.shape}")
    if share < 0:
        raise ValueError(f"share must be >= 0, got {share}")
    radius = round(share * max(mask.shape))
    if radius == 0 or not mask.any():
        return mask.copy()
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(np.ascontiguousarray(mask, dtype=np.uint8), disc).astype(bool)


def cam_share_in_lungs(cam: np.ndarray, mask: np.ndarray) -> float:
    """Return the share of the Grad-CAM mass that lies inside the lungs: ``sum(cam * mask) / sum(cam)`` in [0, 1].

    Args:
        cam: (h, w) non-negative saliency map of the same field of view as the mask (for a map computed on a
            letterboxed input, undo the letterbox first: ``covidxr.preprocessing.transforms.unletterbox``). Resized
            bilinearly to the mask's size when the sizes differ.
        mask: (H, W) boolean lung mask.

    Returns:
        The share, or NaN when the map has no mass (all zeros).

    Raises:
        ValueError: a negative or non-finite map value, or arrays that are not 2-D.
    """
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask).astype(bool, copy=False)
    if cam.ndim != 2 or mask.ndim != 2:
        raise ValueError(f"cam and mask must be (H, W) arrays, got shapes {cam.shape} and {mask.shape}")
    if not np.isfinite(cam).all() or (cam < 0).any():
        raise ValueError("cam must be finite and non-negative (Grad-CAM maps are; clip signed maps first)")
    if cam.shape != mask.shape:
        cam = resize(cam, mask.shape)
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else float("nan")


def resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (h, w) map to ``shape`` (antialiased when shrinking), as float64."""
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))[None, None]
    shrink = shape[0] < values.shape[0] or shape[1] < values.shape[1]
    out = F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].numpy()
