"""The trained lung model: where it lives, its checkpoint format, and :class:`LungModel` that masks images."""

from __future__ import annotations

import functools
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from torch import nn

from covidxr.errors import CheckpointError, one_line
from covidxr.files import atomic_write_bytes
from covidxr.lungs.net import build_net
from covidxr.preprocessing.transforms import letterbox, unletterbox

FORMAT = "covidxr-lung-seg"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("arch", "img_size", "preprocess", "threshold", "model")
TRAIN_HINT = "run python -m covidxr.lungs train"


def covidxr_home() -> Path:
    """Return ``$COVIDXR_HOME``, or ``~/.cache/covidxr`` when it is unset."""
    return Path(os.environ.get("COVIDXR_HOME") or Path.home() / ".cache" / "covidxr").expanduser()


LUNG_MODEL_NAME = "lung-seg.pt"


def default_lung_model_path() -> Path:
    """Return where ``python -m covidxr.lungs train`` saves the lung model and :func:`load_lung_model` finds it:
    ``$COVIDXR_HOME/lungs/lung-seg.pt``."""
    return covidxr_home() / "lungs" / LUNG_MODEL_NAME


def metrics_path(checkpoint: str | os.PathLike) -> Path:
    """Return the metrics JSON written beside a lung checkpoint (``lung-seg.pt`` -> ``lung-seg.metrics.json``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".metrics.json")


def save_lung_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write a lung checkpoint dict (see :func:`read_lung_checkpoint` for its keys) atomically.

    Raises:
        CheckpointError: the file could not be written; any previous file at ``path`` is left intact.
    """
    buffer = io.BytesIO()
    torch.save({**checkpoint, "format": FORMAT, "format_version": FORMAT_VERSION}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CheckpointError(f"{path}: could not save the lung model ({exc.strerror or exc}); previous file kept") \
            from exc


def read_lung_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a lung checkpoint safely (``weights_only=True``, no code runs) and check that it is one.

    The dict holds ``format``, ``arch`` (network record for :func:`covidxr.lungs.net.build_net`), ``img_size``,
    ``preprocess``, ``threshold``, ``model`` (state dict), and, from training, ``metrics``, ``split``, ``config``
    and ``versions``.

    Raises:
        CheckpointError: missing, unreadable, unsafe, or not a lung model; the message says how to make one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no lung model at {path}: {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"no lung model at {path} (the file needs code execution to load): {TRAIN_HINT}") \
            from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raise CheckpointError(f"no lung model at {path} (unreadable: {one_line(exc, 120)}): {TRAIN_HINT}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"no lung model at {path} (found {found or 'a plain state dict'}): {TRAIN_HINT}")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"no lung model at {path} (it lacks {', '.join(missing)}): {TRAIN_HINT}")
    return ckpt


class LungModel:
    """A trained lung segmentation network with its preprocessing; masks images of any size.

    The image is letterboxed to ``img_size`` (as ``covidxr.preprocessing.transforms.letterbox``), segmented, and the
    lung probability is mapped back onto the image's own (H, W) before thresholding. The model always runs in eval mode
    on the CPU unless moved with :meth:`to`.
    """

    def __init__(self, net: nn.Module, img_size: int, threshold: float = 0.5, info: dict | None = None) -> None:
        self.net = net.eval()
        self.img_size = int(img_size)
        self.threshold = float(threshold)
        self.info = info or {}
        self.device = next(net.parameters()).device

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str = "checkpoint") -> LungModel:
        """Rebuild the model of a checkpoint dict (see :func:`read_lung_checkpoint`).

        Raises:
            CheckpointError: the architecture is unknown or the weights do not fit it.
        """
        try:
            net = build_net(dict(ckpt["arch"]), pretrained=False)
            net.load_state_dict(ckpt["model"], strict=True)
        except (ValueError, RuntimeError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{source}: lung model does not fit its arch {ckpt.get('arch')}: {one_line(exc)}") \
                from exc
        info = {key: ckpt[key] for key in ("arch", "preprocess", "metrics", "split", "config") if key in ckpt}
        return cls(net, int(ckpt["img_size"]), float(ckpt["threshold"]), info)

    def to(self, device: str | torch.device) -> LungModel:
        """Move the network to ``device``; returns self."""
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def probabilities(self, images: Sequence[np.ndarray],
                      shapes: Sequence[tuple[int, int] | None] | None = None) -> list[np.ndarray]:
        """Return the lung probability of each image, float32 (H, W) in [0, 1] at the image's own size.

        Args:
            images: (H, W) float images in [0, 1] (as ``covidxr.images.reader.load_xray(...).pixels``), sizes may
            differ;
                uint8 images are read as value / 255.
            shapes: per image, the (height, width) to return the probability at instead of the image's own (the
                same aspect ratio, e.g. its display size), or None for the image's own. The network's input is the
                same either way; only the last upsampling stops at the smaller size.
        """
        images = [_check_image(image) for image in images]
        if not images:
            return []
        shapes = [None] * len(images) if shapes is None else list(shapes)
        batch = torch.stack([letterbox(image, self.img_size) for image in images]).to(self.device)
        with torch.inference_mode():
            probs = torch.sigmoid(self.net(batch).float())[:, 0].cpu().numpy()
        return [unletterbox(p, *(shape or image.shape)).clip(0.0, 1.0).astype(np.float32)
                for p, image, shape in zip(probs, images, shapes, strict=True)]

    def masks(self, images: Sequence[np.ndarray], batch_size: int = 16,
              shapes: Sequence[tuple[int, int] | None] | None = None) -> list[np.ndarray]:
        """Return the boolean (H, W) lung mask of each image (or at ``shapes``, see :meth:`probabilities`), in
        batches of ``batch_size``.

        The probability is thresholded and holes are filled: the training masks have none, while dense opacities
        inside a lung (the network learned aerated lung from normal films) would otherwise leave some.
        """
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            part = None if shapes is None else shapes[start : start + batch_size]
            probs = self.probabilities(images[start : start + batch_size], part)
            out.extend(scipy.ndimage.binary_fill_holes(p >= self.threshold) for p in probs)
        return out

    def mask(self, image: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Return the boolean lung mask of one (H, W) image in [0, 1], at the image's size or at ``shape`` (a
        smaller size of the same aspect ratio: a 5,000 px film's mask at its 1,024 px display size takes a tenth of
        the time, the hole filling above all)."""
        return self.masks([image], shapes=None if shape is None else [shape])[0]

    def __repr__(self) -> str:
        return f"LungModel(arch={self.info.get('arch')}, img_size={self.img_size}, threshold={self.threshold})"


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected an (H, W) grey image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32, copy=False)
    if np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0:  # a decoded film: no copies
        return image
    return np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)


def load_lung_model(path: str | os.PathLike | None = None) -> LungModel:
    """Return the lung model saved at ``path`` (default: :func:`default_lung_model_path`), on the CPU.

    Loaded models are cached per file (path, size and modification time), so calling this per image is cheap and a
    retrained file is picked up. The cached model is shared: don't train or move it in place.

    Raises:
        CheckpointError: no lung model there ("no lung model at PATH: run python -m covidxr.lungs train").
    """
    resolved = Path(path).expanduser().resolve() if path is not None else default_lung_model_path().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise CheckpointError(f"no lung model at {resolved}: {TRAIN_HINT}") from None
    return _load_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int) -> LungModel:
    return LungModel.from_checkpoint(read_lung_checkpoint(path), path)
