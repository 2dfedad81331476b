"""Carrying out the input settings (defined in ``covidxr.preprocessing.settings``): the path from a decoded X-ray to the
network's square input, lung crop (optional), lung mask (optional), equalisation (optional), letterbox.

:class:`InputPipeline` holds what the preprocessing record asks for (the
:class:`~covidxr.preprocessing.settings.InputRecord` fields of ``covidxr.preprocessing.transforms.Preprocess``:
``lung_crop``, ``lung_margin``, ``lung_mask``, ``lung_mask_dilation`` and ``equalize``) and, for a lung crop, the lung
model.
The prepared cache (``covidxr.data.cache``), the data loaders, the predictor (and so the app), cross-validation and
``explain score`` all call :meth:`InputPipeline.prepare`, so a model sees the same pixels in training, evaluation
and prediction.

A lung mask (``--lung-mask``) crops as the lung crop does and then blacks out (0, as the letterbox's padding) every
pixel of the crop outside the lung mask widened by ``lung_mask_dilation`` of the crop's longer side, so that text
markers, borders, devices and body outside the lungs cannot tell the hospital; the equalisation then learns from the
pixels inside the mask alone (``covidxr.preprocessing.transforms.equalize_inside``). When the mask does not look like
lungs the lung box falls back to the whole image (``covidxr.lungs.lung_box``), and then nothing is blacked out either.

A lung crop or mask needs the lung model (``covidxr.lungs``): training reads it from its file (:func:`read_lung_entry`,
``$COVIDXR_HOME/lungs/lung-seg.pt`` by default) and stores it in the classifier checkpoint under ``"lung_model"``
(state dict, ``arch``, ``img_size``, ``threshold`` and the SHA-256 of the file, about 4.5 MB); everything that
loads the checkpoint rebuilds the pipeline from there (:func:`pipeline_from_checkpoint`) and needs nothing else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from covidxr.errors import CheckpointError
from covidxr.lungs import LungBox, LungModel, default_lung_model_path, lung_box
from covidxr.lungs.geometry import dilate_mask
from covidxr.lungs.model import read_lung_checkpoint
from covidxr.preprocessing.settings import EQUALIZE, InputRecord
from covidxr.preprocessing.transforms import (
    Preprocess,
    cache_size,
    equalize,
    equalize_inside,
    eval_transform,
    letterbox,
)

LUNG_ENTRY_KEYS = ("arch", "img_size", "threshold", "model", "sha256")


def read_lung_entry(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Return the lung model at ``path`` (default: ``covidxr.lungs.default_lung_model_path()``) as the checkpoint
    entry a lung-cropping classifier carries: ``arch``, ``img_size``, ``threshold``, ``model`` and ``sha256``.

    Raises:
        CheckpointError: no lung model there ("no lung model at PATH: run python -m covidxr.lungs train").
    """
    path = Path(path).expanduser() if path else default_lung_model_path()
    ckpt = read_lung_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"arch": dict(ckpt["arch"]), "img_size": int(ckpt["img_size"]), "threshold": float(ckpt["threshold"]),
            "model": ckpt["model"], "sha256": digest}


_LUNG_MODELS: dict[str, LungModel] = {}  # by the lung file's SHA-256: each model is rebuilt once per process


def lung_model_of(entry: dict[str, Any]) -> LungModel:
    """Rebuild (once per digest) the lung model of a checkpoint entry (see :func:`read_lung_entry`).

    Raises:
        CheckpointError: the entry lacks a key or its weights do not fit its architecture.
    """
    missing = [key for key in LUNG_ENTRY_KEYS if key not in entry]
    if missing:
        raise CheckpointError(f"lung model entry lacks {', '.join(missing)}")
    sha = str(entry["sha256"])
    if sha not in _LUNG_MODELS:
        _LUNG_MODELS[sha] = LungModel.from_checkpoint(entry, f"lung model {sha[:12]}")
    return _LUNG_MODELS[sha]


class Prepared(NamedTuple):
    """One image made ready for the network: the letterboxed square and, with a lung crop, the box and mask."""

    square: np.ndarray  # (size, size) uint8, as stored in the prepared cache
    box: LungBox | None  # the crop in the original image's pixels (None without a lung crop)
    mask: np.ndarray | None  # (H, W) bool lung mask of the original image (None without a lung crop)


@dataclass(frozen=True)
class InputPipeline(InputRecord):
    """Lung crop -> lung mask -> equalisation -> letterbox, as a preprocessing record asks (see the module
    docstring): the :class:`~covidxr.preprocessing.settings.InputRecord` fields and, with a lung crop, the lung model.

    Attributes:
        lung_entry: the lung model's checkpoint entry (:func:`read_lung_entry`); required with ``lung_crop``.
    """

    lung_entry: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lung_mask_dilation < 0:
            raise ValueError(f"lung_mask_dilation must be >= 0, got {self.lung_mask_dilation}")
        if self.equalize not in EQUALIZE:
            raise ValueError(f"unknown equalisation {self.equalize!r}; choose one of {', '.join(EQUALIZE)}")
        if self.lung_crop and self.lung_entry is None:
            raise ValueError("a lung crop needs the lung model (lung_entry)")

    @property
    def lungs(self) -> LungModel | None:
        """The lung model (None without a lung crop)."""
        return lung_model_of(self.lung_entry) if self.lung_crop else None

    @property
    def key(self) -> str:
        """What tells this variant's prepared squares apart in the cache ("" for the plain letterbox)."""
        parts = []
        if self.lung_crop:
            parts.append(f"lungs={self.lung_entry['sha256'][:16]}:{self.lung_margin:g}")
        if self.lung_mask:
            parts.append(f"mask={self.lung_mask_dilation:g}")
        if self.equalize != "none":
            parts.append(f"eq={self.equalize}")
        return ",".join(parts)

    def prepare(self, image: np.ndarray, size: int) -> Prepared:
        """Turn a decoded (H, W) float image in [0, 1] (``covidxr.images.reader.load_xray(...).pixels``) into the uint8
        (size, size) square: lung crop (if set), lung mask (if set, unless the lung box fell back), equalisation
        (if set; with the mask, from the pixels inside it), letterbox."""
        image = np.asarray(image)
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        box = mask = None
        if self.lung_crop:
            mask = self.lungs.mask(image)
            box = lung_box(mask, self.lung_margin)
            image = image[box.slices]
        if self.lung_mask and not box.fell_back:
            image = equalize_inside(image, dilate_mask(mask[box.slices], self.lung_mask_dilation), self.equalize)
        else:
            image = equalize(image, self.equalize)
        square = letterbox(image, size)[0].mul(255).round().to(torch.uint8).numpy()
        return Prepared(square, box, mask)

    def network_input(self, image: np.ndarray, img_size: int) -> tuple[torch.Tensor, Prepared]:
        """Return the (1, img_size, img_size) network input as training and evaluation see it, and the preparation.

        Training and evaluation read the squares prepared at ``cache_size(img_size)`` (from the cache) and resize
        them to ``img_size``; prediction takes the same two steps, so a model sees the same pixels everywhere.
        """
        prepared = self.prepare(image, cache_size(img_size))
        square = torch.from_numpy(prepared.square).float().div_(255.0)[None]
        return eval_transform(img_size)(square), prepared

    def uncrop(self, heat: np.ndarray | None, prepared: Prepared, height: int, width: int) -> np.ndarray | None:
        """Place a heatmap of the cropped image (already un-letterboxed to the crop's size) onto the original
        (height, width) image; outside the crop, which the network did not see, it is 0. With a lung mask the heat
        on the blacked-out part of the crop stays: the network saw that black, and may have looked at it."""
        if heat is None or prepared.box is None:
            return heat
        out = np.zeros((height, width), dtype=heat.dtype)
        out[prepared.box.slices] = heat
        return out

    def record(self, pre: Preprocess) -> Preprocess:
        """``pre`` with this pipeline's lung crop, lung mask and equalisation."""
        return replace(pre, **self.input_record())

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a checkpoint carries besides the record: ``{"lung_model": entry}`` with a lung crop, else nothing."""
        return {"lung_model": self.lung_entry} if self.lung_crop else {}


PLAIN = InputPipeline()


def pipeline_from_checkpoint(lung_entry: Any, pre: Preprocess, source: str = "checkpoint") -> InputPipeline:
    """The pipeline a classifier checkpoint was trained with (older checkpoints: the plain letterbox), from its
    preprocessing record ``pre`` and its lung model entry (``ckpt.get("lung_model")``, None when it has none).

    Raises:
        CheckpointError: the record asks for a lung crop (or mask) but the checkpoint lacks its lung model, or an
            unknown equalisation.
    """
    if pre.lung_crop and not isinstance(lung_entry, dict):
        raise CheckpointError(f"{source}: preprocessing crops to the lungs but the checkpoint has no lung model")
    try:
        return InputPipeline(**pre.input_record(), lung_entry=lung_entry)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def require_lung_model(path: str | os.PathLike | None) -> None:
    """Fail early, before any data is read, when a lung crop (or mask) is asked for and there is no lung model.

    Raises:
        CheckpointError: "no lung model at PATH: run python -m covidxr.lungs train".
    """
    read_lung_checkpoint(Path(path).expanduser() if path else default_lung_model_path())
