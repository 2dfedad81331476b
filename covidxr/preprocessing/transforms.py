"""The geometry (letterbox to a square), the augmentations, and the preprocessing record a checkpoint stores
(:class:`Preprocess`: the input settings of ``covidxr.preprocessing.settings``, where they are defined, plus the image
size, the normalisation and the geometry).

Pipeline: ``covidxr.images.reader.load_xray`` gives an (H, W) float image in [0, 1]; optionally it is cropped to the
lungs, blacked out outside them and its intensities equalised (the record's ``lung_crop``, ``lung_mask`` and
``equalize``;
the whole chain is ``covidxr.model.input_pipeline.InputPipeline.prepare``); :func:`letterbox` pads it to a square with
black borders (nothing of the chest is cropped) and resizes it; the model itself repeats the grey channel and
normalises with the mean/std of its pretrained weights (see ``covidxr.networks.architectures``), so the tensors handled
here are always (1, S, S) floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from covidxr.preprocessing.settings import EQUALIZE, InputRecord
from covidxr.preprocessing.style_augment import StyleRanges, apply_style

Transform = Callable[[torch.Tensor], torch.Tensor]

CLAHE_CLIP = 2.0  # OpenCV's contrast limit per tile (its default is 40, which amplifies noise on radiographs)
CLAHE_TILES = (8, 8)


@dataclass(frozen=True)
class Preprocess(InputRecord):
    """What turns a decoded X-ray into the network input; stored in every checkpoint.

    Attributes:
        img_size: side of the square network input, in pixels.
        mean: per-channel normalisation mean of the pretrained weights (applied inside the model).
        std: per-channel normalisation std of the pretrained weights (applied inside the model).
        geometry: how the image is made square; only "letterbox" (pad, then resize) exists.

    The lung crop, lung mask and equalisation are the :class:`~covidxr.preprocessing.settings.InputRecord` fields (with
    a lung crop, the lung model travels in the checkpoint).
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
        """Rebuild from :meth:`to_dict` output, ignoring unknown keys (records older than lung_crop, equalize or
        lung_mask read as without them)."""
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        for key in ("lung_crop", "lung_mask"):
            if key in known:
                known[key] = bool(known[key])
        for key in ("lung_margin", "lung_mask_dilation"):
            if key in known:
                known[key] = float(known[key])
        return cls(**known)


def equalize(image: np.ndarray, method: str) -> np.ndarray:
    """Return an (H, W) float image in [0, 1] with its intensities equalised by ``method`` (see :data:`EQUALIZE`).

    Both methods work on 8 bits (as the libraries do): "hist" is torchvision's histogram equalisation, "clahe"
    OpenCV's contrast-limited adaptive one (clip :data:`CLAHE_CLIP`, :data:`CLAHE_TILES` tiles).
    """
    if method == "none":
        return image
    if method not in EQUALIZE:
        raise ValueError(f"unknown equalisation {method!r}; choose one of {', '.join(EQUALIZE)}")
    scaled = np.multiply(np.asarray(image, dtype=np.float32), np.float32(255.0))  # in place from here: one array
    np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)  # rint is np.round's own rounding (half to even)
    grey = scaled.astype(np.uint8)
    if method == "hist":
        out = _equalize_hist(grey)
    else:
        out = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(grey)
    return _UNIT_8[out]  # the 256 values / 255 as float32: the same floats as dividing every pixel


_UNIT_8 = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _equalize_hist(grey: np.ndarray) -> np.ndarray:
    """torchvision's histogram equalisation (``v2.functional.equalize``, PIL's scheme) of a uint8 array, in numpy.

    The same integer steps, so the same output to the bit (``tests/test_preprocess.py`` checks), in a tenth of the
    time on a 5,000 px film: a histogram of the bytes (``bincount``) and a 256-entry table, where torchvision widens
    every pixel to int64 for ``scatter_add_`` and ``gather``.
    """
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.int64)
    cum_hist = np.cumsum(hist)
    non_max = grey.size - int(hist[int(np.argmax(cum_hist))])  # the pixels below the image's largest value
    step = non_max // 255
    if step == 0:
        return grey
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:] = np.clip((cum_hist[:-1] + step // 2) // step, 0, 255)
    return lut[grey]


def equalize_inside(image: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """Return an (H, W) float image in [0, 1]: black (0) outside ``mask``, and inside it ``image`` equalised by
    ``method`` as :func:`equalize` does, but from the pixels inside ``mask`` alone.

    Nothing outside the mask changes the result. Equalising the blacked-out image instead would count the black
    background as part of the histogram: "hist" would squeeze the lungs into the upper grey levels (by the black
    share), and how much would vary with the mask's size from film to film. "hist" equalises the inside pixels as
    one list (the same torchvision mapping); OpenCV's CLAHE has no mask, so the outside is first filled with the
    nearest inside pixel's value, and its local histograms near the mask's edge see lung values only.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape}")
    out = np.zeros(image.shape, dtype=np.float32)
    if not mask.any():
        return out
    if method == "hist":
        inside = np.asarray(image, dtype=np.float32)[mask]
        out[mask] = equalize(inside[None], method)[0]
    elif method == "clahe":
        nearest = scipy.ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
        out[mask] = equalize(np.asarray(image)[tuple(nearest)], method)[mask]
    else:
        out[mask] = equalize(np.asarray(image, dtype=np.float32), method)[mask]
    return out


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


@dataclass(frozen=True)
class AugmentRanges:
    """The ranges of the training augmentation (:func:`augment_batch`, per image or per batch)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)  # area of the random crop, as a share of the image
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # its aspect ratio
    degrees: float = 7.0  # rotation up to +/- this
    translate: float = 0.04  # shift up to +/- this share of the side
    brightness: float = 0.15  # factor in 1 +/- this
    contrast: float = 0.15  # factor in 1 +/- this


AUGMENT = AugmentRanges()


class TrainAugment:
    """The training augmentation (:func:`augment_batch`) of one (1, S, S) image or a (B, 1, S, S) batch.

    Radiographs are not flipped: the heart's side is anatomy, and a mirrored chest is not a plausible input.
    Randomness comes from torch's default generator, which ``DataLoader`` seeds in each worker. ``style`` adds the
    scanner-style augmentation (``--augment style``; None: without it).
    """

    def __init__(self, img_size: int, ranges: AugmentRanges = AUGMENT, style: StyleRanges | None = None) -> None:
        self.img_size, self.ranges, self.style = img_size, ranges, style

    def __call__(self, squares: torch.Tensor) -> torch.Tensor:
        if squares.dim() == 4:
            return augment_batch(squares, self.img_size, None, self.ranges, self.style)
        return augment_batch(squares.unsqueeze(0), self.img_size, None, self.ranges, self.style)[0]

    def __repr__(self) -> str:
        return f"TrainAugment(img_size={self.img_size}, ranges={self.ranges}, style={self.style})"


def train_transform(img_size: int, ranges: AugmentRanges = AUGMENT, style: StyleRanges | None = None) -> Transform:
    """Return the training augmentation for (1, S, S) inputs: mild crops, rotations, shifts and contrast, then the
    scanner-style augmentation when ``style`` is given."""
    return TrainAugment(img_size, ranges, style)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).mul_(high - low).add_(low)


def augment_params(n: int, generator: torch.Generator | None = None,
                   ranges: AugmentRanges = AUGMENT) -> dict[str, torch.Tensor]:
    """Draw per-sample augmentation parameters on the CPU, so that a seed gives the same batch on every device.

    ``generator`` None draws from torch's default generator (in loader processes: seeded per worker by the loader).

    Returns float64 tensors of length ``n``: crop width/height and centre (as fractions of the source side),
    rotation (radians), translation (fractions of the output side), brightness and contrast factors.
    """
    r = ranges
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


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, height, width], align_corners=False)``, computed as two outer sums.

    The library builds the grid with a batched matrix product of inner size 3, which on the CPU takes longer than
    the sampling itself; an affine map of a regular grid is separable into row and column terms.
    """
    kw = {"device": theta.device, "dtype": theta.dtype}
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, **kw).view(1, 1, width)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, **kw).view(1, height, 1)
    t = theta.unsqueeze(-1).unsqueeze(-1)  # (n, 2, 3, 1, 1)
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
    return torch.stack([gx, gy], dim=-1)


def augment_batch(squares: torch.Tensor, img_size: int, generator: torch.Generator | None = None,
                  ranges: AugmentRanges = AUGMENT, style: StyleRanges | None = None) -> torch.Tensor:
    """The training augmentation: (B, 1, S', S') floats in [0, 1] -> (B, 1, img_size, img_size) in [0, 1].

    Per sample: random resized crop, rotation and shift as one affine map (so each output pixel is interpolated
    once, bilinearly), then brightness and then contrast factors; the ranges are ``ranges``. With ``style``, the
    scanner-style augmentation follows (:func:`covidxr.preprocessing.style_augment.apply_style`; its draws come after
    these, so without it the output is unchanged). Runs on the device of ``squares``; the parameters come from
    ``generator`` (a CPU generator; None: torch's default one).
    """
    n = squares.shape[0]
    params = augment_params(n, generator, ranges)
    theta = affine_matrices(params).to(device=squares.device, dtype=squares.dtype)
    grid = affine_grid(theta, img_size, img_size)
    out = F.grid_sample(squares, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    factor = params["brightness"].to(device=squares.device, dtype=squares.dtype).view(n, 1, 1, 1)
    out = out.mul_(factor).clamp_(0.0, 1.0)
    contrast = params["contrast"].to(device=squares.device, dtype=squares.dtype).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = out.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0.0, 1.0)
    return out if style is None else apply_style(out, generator, style)


def eval_transform(img_size: int) -> Transform:
    """Return the evaluation transform for (1, S', S') inputs or (B, 1, S', S') batches: a plain resize."""
    return v2.Resize((img_size, img_size), antialias=True)
