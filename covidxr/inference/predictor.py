"""One predictor for the command line and the app.

>>> predictor = Predictor.from_checkpoint("runs/resnet50/best.pt")
>>> result = predictor.predict(load_xray("chest.dcm"), cam="gradcam")
>>> result.label, result.confidence, result.heatmap.shape      # heatmap on the original image geometry

Everything comes from the checkpoint alone: architecture, classes, preprocessing (input size, normalisation) and
the probability temperature (``ckpt["temperature"]``, 1.0 when absent). A checkpoint whose weights do not fit its
architecture and class count is refused with one :class:`~covidxr.errors.CheckpointError` line (strict loading).

Backends (plain predictions only; Grad-CAM always runs in torch, see :mod:`covidxr.explain`):

* ``"torch"``: the PyTorch model, on ``device``.
* ``"onnx"``: ONNX Runtime on the CPU, with the export beside the checkpoint (``best.onnx`` for ``best.pt``) when
  it was made from this very checkpoint (its SHA-256 is recorded in the ONNX metadata). Otherwise the model is
  exported on first use: written beside the checkpoint (atomically) when that folder is writable, else kept in
  memory. ``python -m covidxr.export`` makes the file ahead of time.
* ``"auto"`` (default): ONNX Runtime on the CPU when onnxruntime is installed and a fresh export exists beside the
  checkpoint; torch otherwise. ``"auto"`` never exports by itself (no surprise writes, no export delay at start-up).

Every prediction carries the input gate's verdict (:mod:`covidxr.model.gate`): is the image an assessable frontal
chest radiograph, and if not, why. The gate's learned checks read the pooled backbone features of the same forward
pass (captured at the head's input), so they need torch: with a fitted gate, ``"auto"`` uses torch, and ``"onnx"``
adds a torch backbone pass for the gate.

A :class:`Predictor` may be shared between threads: model calls are serialised by an internal lock (CAM hooks
must not see another thread's forward pass). The command line, ``python -m covidxr.predict``, is
:mod:`covidxr.inference.__main__`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from covidxr.images.reader import Xray
from covidxr.inference.decision import OperatingPoint, operating_point
from covidxr.inference.onnx_backend import (
    OnnxRunner,
    default_onnx_path,
    export_bytes,
    export_metadata,
    fresh_runner,
    onnxruntime_available,
    write_onnx,
)
from covidxr.inference.prediction import Prediction
from covidxr.lungs import LungModel
from covidxr.model.cam import CAM_METHODS
from covidxr.model.input_pipeline import Prepared
from covidxr.model.trained import TrainedModel
from covidxr.utils import softmax

log = logging.getLogger("covidxr.predict")

BACKENDS = ("auto", "torch", "onnx")


# ------------------------------------------------------------------------------------------------- loading


def _data_summary(record: Mapping[str, Any]) -> dict:
    """Summarise the training data recorded in a checkpoint (no file lists).

    Returns:
        ``root``, ``n_images``, ``n_unreadable``, ``patients`` and ``split_counts`` ({split: {class: n}}) where known.
    """
    data = record.get("data") or {}
    summary: dict = {k: data[k] for k in ("root", "n_images") if k in data}
    if isinstance(data.get("unreadable"), dict):
        summary["n_unreadable"] = len(data["unreadable"])
    split = record.get("split")
    if isinstance(split, dict) and {"label", "split"} <= set(split):
        counts: dict[str, dict[str, int]] = {}
        for label, part in zip(split["label"], split["split"], strict=False):
            counts.setdefault(part, {}).setdefault(label, 0)
            counts[part][label] += 1
        summary["split_counts"] = counts
        if "patient_id" in split:
            summary["patients"] = len(set(split["patient_id"]))
    return summary


def _as_pixels(image: np.ndarray | Xray) -> np.ndarray:
    """Return the ``(H, W)`` image of an :class:`~covidxr.images.reader.Xray` or of an array (float in ``[0, 1]``, or
    uint8 read as value/255), checked.

    Raises:
        ValueError: for other shapes, non-finite values or floats outside ``[0, 1]``.
    """
    pixels = image.pixels if isinstance(image, Xray) else np.asarray(image)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"expected an (H, W) grey image, got shape {pixels.shape}; read files with "
                         "covidxr.images.reader.load_xray")
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.number):
            raise ValueError(f"image must be numeric, got dtype {pixels.dtype}")
        if not np.isfinite(pixels).all() or pixels.min() < -1e-6 or pixels.max() > 1 + 1e-6:
            raise ValueError("float images must be finite and in [0, 1] (uint8 images are read as value/255)")
    return pixels


# ----------------------------------------------------------------------------------------------- predictor


class Predictor:
    """A trained model ready to predict and explain (see the module docstring): a
    :class:`~covidxr.model.trained.TrainedModel` plus what the app and ONNX need (the backend choice, image checks,
    one prediction per film).

    Attributes:
        trained: the trained model (network, classes, preprocessing, calibration, gate, site profile).
        runner: the ONNX Runtime runner of plain predictions, or None (torch).
        info: ``arch``, ``classes``, ``img_size``, ``epoch``, ``best_epoch``, ``best_auc``, ``temperature``,
            ``created``, ``versions``, ``data`` (summary), ``config``, ``gate`` and ``site``.
    """

    def __init__(self, trained: TrainedModel, runner: OnnxRunner | None = None) -> None:
        self.trained = trained
        self.runner = runner
        record = trained.record
        gate = trained.gate
        self.info = {"arch": trained.arch, "classes": list(trained.classes), "img_size": trained.img_size,
                     "epoch": record.get("epoch"), "best_epoch": record.get("best_epoch"),
                     "best_auc": record.get("best_auc"), "temperature": self.temperature,
                     "created": record.get("created"), "versions": record.get("versions") or {},
                     "data": _data_summary(record), "config": dict(trained.config),
                     "gate": {"learned": gate.learned, "unavailable": gate.unavailable, **gate.info},
                     "site": None if trained.site is None else {**trained.site.summary(),
                                                                "describe": trained.site.describe()}}

    # What the app, the command line and the ONNX export read of the trained model.
    model = property(lambda self: self.trained.network, doc="the torch network (eval mode, frozen).")
    arch = property(lambda self: self.trained.arch, doc='architecture name ("ensemble of 3 ..." for an ensemble).')
    classes = property(lambda self: list(self.trained.classes), doc="class names, in the network's output order.")
    preprocess = property(lambda self: self.trained.preprocess, doc="the checkpoint's preprocessing record.")
    pipeline = property(lambda self: self.trained.pipeline, doc="lung crop, lung mask and equalisation.")
    temperature = property(lambda self: self.trained.calibration.temperature, doc="probability temperature.")
    checkpoint_path = property(lambda self: self.trained.path, doc="the checkpoint file.")
    checkpoint_sha256 = property(lambda self: self.trained.sha256, doc="SHA-256 of the checkpoint file.")
    device = property(lambda self: self.trained.device, doc="the torch device.")
    gate = property(lambda self: self.trained.gate, doc="the input gate (file checks only when none was fitted).")
    site = property(lambda self: self.trained.site, doc="the site profile the model runs with, or None.")
    gate_model = property(lambda self: self.trained.gate_network,
                          doc="under an adapted site profile with a fitted gate, the unadapted network the gate reads.")

    @property
    def metrics(self) -> dict | None:
        """The stored evaluation summary (the calibration sidecar's), or None."""
        return dict(self.trained.calibration.summary) or None

    @property
    def operating_point(self) -> OperatingPoint:
        """Where this model says "COVID: yes": the threshold its stored evaluation fixed (see
        :mod:`covidxr.inference.decision`)."""
        return operating_point(self.classes, self.metrics)

    @property
    def backend(self) -> str:
        """``"onnx"`` when plain predictions run on ONNX Runtime, else ``"torch"``."""
        return "onnx" if self.runner is not None else "torch"

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", backend: str = "auto",
                        site: str | os.PathLike | None = None) -> Predictor:
        """Load a predictor from a covidxr checkpoint (:meth:`covidxr.model.trained.TrainedModel.load`).

        Args:
            path: the checkpoint file (``RUN/best.pt``).
            device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ...
            backend: ``"auto"``, ``"torch"`` or ``"onnx"`` (see the module docstring).
            site: a site profile of this checkpoint (``python -m covidxr.adapt``); its statistics and priors go into
                the model (a refused profile leaves the model as it is), and ``"auto"`` then runs torch.

        Returns:
            The predictor.

        Raises:
            CheckpointError: missing, unsafe or invalid checkpoint.
            SiteProfileError: a site profile made for another checkpoint, or damaged.
            CovidxrError: unavailable device, or ``backend="onnx"`` without onnxruntime or with a failed export.
            ValueError: unknown backend.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        predictor = cls(TrainedModel.load(path, device=device, site=site))
        predictor.runner = predictor._open_runner(backend)
        return predictor

    def _open_runner(self, backend: str) -> OnnxRunner | None:
        """Return the ONNX Runtime runner the backend choice asks for (None: use torch)."""
        adapted = self.site is not None and self.site.adapted
        if backend == "torch" or (backend == "auto" and (self.device.type != "cpu" or not onnxruntime_available()
                                                         or self.gate.learned or adapted)):
            return None
        meta = export_metadata(self.checkpoint_sha256, self.arch, self.classes, self.preprocess.img_size,
                               self.site.summary() if adapted else None)
        if adapted:  # the export beside the checkpoint is the unadapted model's; the adapted one stays in memory
            return OnnxRunner(export_bytes(self.model, self.preprocess.img_size, meta))
        target = default_onnx_path(self.checkpoint_path)
        runner = fresh_runner(target, self.checkpoint_sha256)
        if runner is not None or backend == "auto":
            return runner
        data = export_bytes(self.model, self.preprocess.img_size, meta)
        if os.access(target.parent, os.W_OK):
            write_onnx(target, data)
            log.info("exported %s", target)
        return OnnxRunner(data)

    def class_index(self, cls: str | int) -> int:
        """Return the output index of a class given by name or index (``int`` or a string of digits).

        Raises:
            ValueError: for an unknown class.
        """
        if isinstance(cls, str) and cls in self.classes:
            return self.classes.index(cls)
        if isinstance(cls, (int, np.integer)) or (isinstance(cls, str) and cls.strip().isdigit()):
            index = int(cls)
            if 0 <= index < len(self.classes):
                return index
        raise ValueError(f"unknown class {cls!r}; choose one of {', '.join(self.classes)} "
                         f"(or an index 0-{len(self.classes) - 1})")

    def predict(self, image: np.ndarray | Xray, *, cam: str | None = "gradcam", cam_class: str | int | None = None,
                name: str = "", cam_layer: str | None = None) -> Prediction:
        """Predict one image and, unless ``cam`` is None, explain it, with a single forward pass.

        Args:
            image: an :class:`~covidxr.images.reader.Xray` or an ``(H, W)`` array (float in ``[0, 1]``, or uint8).
            cam: a method of :data:`covidxr.model.cam.CAM_METHODS`, or None (or ``"none"``) for no heatmap.
            cam_class: class to explain (name or index); None explains the predicted class. Ignored without ``cam``.
            name: the name in the result (default: the Xray's name).
            cam_layer: dotted name of the layer to explain (default: the architecture's last convolutional stage).

        Returns:
            The prediction.

        Raises:
            ValueError: bad image array, unknown method, class or layer.
        """
        return self.predict_batch([image], cam=cam, names=[name], cam_class=cam_class, cam_layer=cam_layer)[0]

    def _fallback_masks(self, pixels: Sequence[np.ndarray], prepared: Sequence[Prepared],
                        lungs: LungModel | None) -> list[np.ndarray | None]:
        """The lung masks of the films whose pipeline has none, from ``lungs`` in one batched pass (None where the
        pipeline has its own mask, or without ``lungs``)."""
        todo = [i for i, prep in enumerate(prepared) if prep.mask is None]
        masks: list[np.ndarray | None] = [None] * len(pixels)
        if lungs is not None and todo:
            for i, mask in zip(todo, lungs.masks([pixels[i] for i in todo]), strict=True):
                masks[i] = mask
        return masks

    def predict_batch(self, images: Sequence[np.ndarray | Xray], *, cam: str | None = None,
                      names: Sequence[str] | None = None, cam_class: str | int | None = None,
                      cam_layer: str | None = None, lungs: LungModel | None = None) -> list[Prediction]:
        """Predict (and optionally explain) several images with one batched forward pass.

        Args:
            images: Xrays or ``(H, W)`` arrays, any sizes.
            cam: CAM method or None (default) / ``"none"``.
            names: one name per image (default: each Xray's name, else ``""``).
            cam_class: class to explain for every image (None: each image's predicted class).
            cam_layer: dotted name of the layer to explain.
            lungs: a lung model that masks the films for ``lung_share`` when the checkpoint's pipeline has no mask of
                its own (the evaluation's fall-back to the installed lung model); None: only the pipeline's mask.

        Returns:
            One prediction per image, in order.

        Raises:
            ValueError: bad image array, names of another length, unknown method, class or layer.
        """
        if not images:
            return []
        if names is not None and len(names) != len(images):
            raise ValueError(f"got {len(names)} names for {len(images)} images")
        method = None if cam is None or cam.strip().lower() == "none" else cam.strip().lower()
        if method is not None and method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {cam!r}; choose one of {', '.join(CAM_METHODS)} or None")
        target = None if cam_class is None or method is None else self.class_index(cam_class)
        pixels = [_as_pixels(image) for image in images]
        labels = [(names[i] if names is not None and names[i] else getattr(img, "name", "")) or ""
                  for i, img in enumerate(images)]
        prepared = [self.pipeline.network_input(p, self.preprocess.img_size) for p in pixels]
        inputs = torch.stack([x for x, _ in prepared])
        heatmaps: list[np.ndarray | None] = [None] * len(images)
        shares: list[float | None] = [None] * len(images)
        notes: list[str | None] = [None] * len(images)
        explained: list[int | None] = [None] * len(images)
        if method is None:
            logits, features = self._logits(inputs)
        else:
            out = self.trained.run(inputs, features=self.gate.learned, cam=method,
                                   cam_targets=None if target is None else [target] * len(images), cam_layer=cam_layer)
            logits, features = out.logits, out.features
            explained = list(out.cam_targets)
            masks = self._fallback_masks(pixels, [prep for _, prep in prepared], lungs)
            for i, (image, (_, prep)) in enumerate(zip(pixels, prepared, strict=True)):
                film = self.trained.film_heat(out.cams[i], image, prep, lungs, mask=masks[i])
                heatmaps[i], notes[i], shares[i] = film.heat, film.note, film.lung_share
        xrays = [img if isinstance(img, Xray) else Xray(p, "array", False, {}, name)
                 for img, p, name in zip(images, pixels, labels, strict=True)]
        verdicts = self.trained.verdicts(xrays, features)
        probs = softmax(logits, self.temperature)
        results = []
        for i in range(len(images)):
            best = int(np.argmax(probs[i]))
            results.append(Prediction(
                name=labels[i], probs={c: float(p) for c, p in zip(self.classes, probs[i], strict=True)},
                label=self.classes[best], confidence=float(probs[i][best]), heatmap=heatmaps[i],
                cam_method=method, cam_class=None if explained[i] is None else self.classes[explained[i]],
                note=notes[i], gate=verdicts[i], lung_share=shares[i],
                logits=tuple(float(v) for v in logits[i])))
        return results

    def _logits(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of a batch without explanation (ONNX Runtime when selected, else torch), and the pooled backbone
        features when the gate needs them.

        Returns:
            ``(B, C)`` float32 logits and ``(B, F)`` features or None.
        """
        if self.runner is not None:
            features = self.trained.features(inputs) if self.gate.learned else None
            return self.runner.logits(inputs), features
        out = self.trained.run(inputs, features=self.gate.learned)
        return out.logits, out.features
