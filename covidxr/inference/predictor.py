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

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from covidxr.calibration_file import with_calibration
from covidxr.checkpoint import load_checkpoint, read_temperature
from covidxr.model.cam import CAM_METHODS, compute_cam
from covidxr.explain.display import heatmap_on_image
from covidxr.files import file_digest
from covidxr.inference.decision import OperatingPoint, operating_point
from covidxr.model.gate import InputGate
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
from covidxr.model.site_profile import SiteProfile, apply_profile, read_profile
from covidxr.io import Xray
from covidxr.lungs import cam_share_in_lungs
from covidxr.model_input import PLAIN, InputPipeline, pipeline_from_checkpoint
from covidxr.models import XrayClassifier, architecture_name, model_from_checkpoint, read_preprocess
from covidxr.preprocess import Preprocess
from covidxr.utils import pick_device, softmax

log = logging.getLogger("covidxr.predict")

BACKENDS = ("auto", "torch", "onnx")


# ------------------------------------------------------------------------------------------------- loading


def load_classifier(ckpt: dict, source: str = "checkpoint") -> XrayClassifier:
    """Return the checkpoint's model (see :func:`covidxr.models.model_from_checkpoint`) frozen, in eval mode."""
    model = model_from_checkpoint(ckpt, source)
    model.eval()
    model.requires_grad_(False)
    return model


def _data_summary(ckpt: dict) -> dict:
    """Summarise the training data recorded in a checkpoint (no file lists).

    Returns:
        ``root``, ``n_images``, ``n_unreadable``, ``patients`` and ``split_counts`` ({split: {class: n}}) where known.
    """
    data = ckpt.get("data") or {}
    summary: dict = {k: data[k] for k in ("root", "n_images") if k in data}
    if isinstance(data.get("unreadable"), dict):
        summary["n_unreadable"] = len(data["unreadable"])
    split = ckpt.get("split")
    if isinstance(split, dict) and {"label", "split"} <= set(split):
        counts: dict[str, dict[str, int]] = {}
        for label, part in zip(split["label"], split["split"], strict=False):
            counts.setdefault(part, {}).setdefault(label, 0)
            counts[part][label] += 1
        summary["split_counts"] = counts
        if "patient_id" in split:
            summary["patients"] = len(set(split["patient_id"]))
    return summary


@contextlib.contextmanager
def head_input(model: XrayClassifier) -> Iterator[list[torch.Tensor]]:
    """Capture the pooled backbone features of the next forward pass (the head's input), on the CPU.

    Only the first call is kept: Score-CAM runs further passes on masked inputs.
    """
    seen: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not seen:
            seen.append(args[0].detach().float().cpu())

    handle = model.head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _as_pixels(image: np.ndarray | Xray) -> np.ndarray:
    """Return the ``(H, W)`` image of an :class:`~covidxr.io.Xray` or of an array (float in ``[0, 1]``, or uint8
    read as value/255), checked.

    Raises:
        ValueError: for other shapes, non-finite values or floats outside ``[0, 1]``.
    """
    pixels = image.pixels if isinstance(image, Xray) else np.asarray(image)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"expected an (H, W) grey image, got shape {pixels.shape}; read files with "
                         "covidxr.io.load_xray")
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.number):
            raise ValueError(f"image must be numeric, got dtype {pixels.dtype}")
        if not np.isfinite(pixels).all() or pixels.min() < -1e-6 or pixels.max() > 1 + 1e-6:
            raise ValueError("float images must be finite and in [0, 1] (uint8 images are read as value/255)")
    return pixels


# ----------------------------------------------------------------------------------------------- predictor


class Predictor:
    """A trained model ready to predict and explain, built from a checkpoint alone (see the module docstring).

    Attributes:
        arch: architecture name.
        classes: class names, in the model's output order.
        preprocess: the checkpoint's preprocessing record.
        temperature: probability temperature (1.0: uncalibrated).
        checkpoint_path: the checkpoint file.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        metrics: the checkpoint's stored evaluation (``ckpt["evaluation"]``), or None.
        info: ``arch``, ``classes``, ``img_size``, ``epoch``, ``best_epoch``, ``best_auc``, ``temperature``,
            ``created``, ``versions``, ``data`` (summary) and ``config``.
        model: the torch model (eval mode, no parameter requires grad).
        device: the torch device.
        backend: what plain predictions use, ``"torch"`` or ``"onnx"``.
        gate: the input gate (file checks only when the checkpoint has no fitted gate).
        site: the site profile the model runs with (:mod:`covidxr.model.site_profile`), or None.
        gate_model: with an adapted site profile and a fitted gate, the unadapted model whose features the gate
            reads (None otherwise: the gate reads the model's own).
    """

    def __init__(self, model: XrayClassifier, classes: list[str], preprocess: Preprocess, temperature: float,
                 checkpoint_path: Path, checkpoint_sha256: str, metrics: dict | None, info: dict,
                 device: torch.device, runner: OnnxRunner | None = None, gate: InputGate | None = None,
                 pipeline: InputPipeline = PLAIN, site: SiteProfile | None = None,
                 gate_model: XrayClassifier | None = None) -> None:
        self.model = model
        self.arch: str = info.get("arch") or model.arch  # "ensemble of 3 efficientnet_lite0" for a seed ensemble
        self.classes = list(classes)
        self.preprocess = preprocess
        self.temperature = float(temperature)
        self.checkpoint_path = Path(checkpoint_path)
        self.checkpoint_sha256 = checkpoint_sha256
        self.metrics = metrics
        self.info = info
        self.device = device
        self.runner = runner
        self.gate = gate if gate is not None else InputGate()
        self.pipeline = pipeline  # lung crop, lung mask and equalisation of the record
        self.site = site
        self.gate_model = gate_model
        self._lock = threading.RLock()

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
        """Load a predictor from a covidxr checkpoint.

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
        path = Path(path)
        ckpt = with_calibration(load_checkpoint(path), path, sha := file_digest(path))
        profile = read_profile(site, sha) if site is not None else None
        adapted = apply_profile(ckpt, profile)
        model = load_classifier(adapted, str(path))
        classes = list(ckpt["classes"])
        preprocess = read_preprocess(ckpt, str(path))
        pipeline = pipeline_from_checkpoint(ckpt, preprocess, str(path))
        temperature = read_temperature(adapted, str(path))
        torch_device = pick_device(device)
        model.to(torch_device)
        gate = InputGate.from_checkpoint(ckpt, str(path))  # fitted on the unadapted model's features
        gate_model = (load_classifier(ckpt, str(path)).to(torch_device) if adapted is not ckpt and gate.learned
                      else None)
        info = {"arch": architecture_name(ckpt), "classes": classes, "img_size": preprocess.img_size,
                "epoch": ckpt.get("epoch"),
                "best_epoch": ckpt.get("best_epoch"), "best_auc": ckpt.get("best_auc"), "temperature": temperature,
                "created": ckpt.get("created"), "versions": ckpt.get("versions") or {},
                "data": _data_summary(ckpt), "config": ckpt.get("config") or {},
                "gate": {"learned": gate.learned, "unavailable": gate.unavailable, **gate.info},
                "site": None if profile is None else {**profile.summary(), "describe": profile.describe()}}
        predictor = cls(model, classes, preprocess, temperature, path, sha, ckpt.get("evaluation"), info,
                        torch_device, gate=gate, pipeline=pipeline, site=profile, gate_model=gate_model)
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
            image: an :class:`~covidxr.io.Xray` or an ``(H, W)`` array (float in ``[0, 1]``, or uint8).
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

    def predict_batch(self, images: Sequence[np.ndarray | Xray], *, cam: str | None = None,
                      names: Sequence[str] | None = None, cam_class: str | int | None = None,
                      cam_layer: str | None = None) -> list[Prediction]:
        """Predict (and optionally explain) several images with one batched forward pass.

        Args:
            images: Xrays or ``(H, W)`` arrays, any sizes.
            cam: CAM method or None (default) / ``"none"``.
            names: one name per image (default: each Xray's name, else ``""``).
            cam_class: class to explain for every image (None: each image's predicted class).
            cam_layer: dotted name of the layer to explain.

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
            with self._lock, head_input(self.model) as seen:
                out = compute_cam(self.model, inputs, method, None if target is None else [target] * len(images),
                                  layer=cam_layer)
            logits, features = out.logits.numpy(), seen[0].numpy()
            explained = list(out.targets)
            for i, (image, (_, prep)) in enumerate(zip(pixels, prepared, strict=True)):
                seen = image[prep.box.slices] if prep.box is not None else image  # what the network saw
                heat, notes[i] = heatmap_on_image(out.maps[i], *seen.shape)
                heatmaps[i] = self.pipeline.uncrop(heat, prep, *image.shape)
                if heatmaps[i] is not None and prep.mask is not None:
                    shares[i] = cam_share_in_lungs(heatmaps[i], prep.mask)
        xrays = [img if isinstance(img, Xray) else Xray(p, "array", False, {}, name)
                 for img, p, name in zip(images, pixels, labels, strict=True)]
        verdicts = self.gate.check_batch(xrays, self._gate_features(inputs, features) if self.gate.learned else None)
        probs = softmax(logits, self.temperature)
        results = []
        for i in range(len(images)):
            best = int(np.argmax(probs[i]))
            results.append(Prediction(
                name=labels[i], probs={c: float(p) for c, p in zip(self.classes, probs[i], strict=True)},
                label=self.classes[best], confidence=float(probs[i][best]), heatmap=heatmaps[i],
                cam_method=method, cam_class=None if explained[i] is None else self.classes[explained[i]],
                note=notes[i], gate=verdicts[i], lung_share=shares[i]))
        return results

    def _gate_features(self, inputs: torch.Tensor, features: np.ndarray | None) -> np.ndarray | None:
        """The features the gate reads: the model's own, or the unadapted model's under a site profile."""
        if self.gate_model is None:
            return features
        with self._lock, torch.inference_mode():
            return self.gate_model.features(inputs.to(self.device)).float().cpu().numpy()

    def _logits(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of a batch without explanation (ONNX Runtime when selected, else torch in inference mode), and the
        pooled backbone features when the gate needs them.

        Returns:
            ``(B, C)`` float32 logits and ``(B, F)`` features or None.
        """
        features = None
        if self.runner is not None:
            if self.gate.learned and self.gate_model is None:
                with self._lock, torch.inference_mode():
                    features = self.model.features(inputs.to(self.device)).float().cpu().numpy()
            return self.runner.logits(inputs), features
        with self._lock, torch.inference_mode(), head_input(self.model) as seen:
            logits = self.model(inputs.to(self.device)).float().cpu().numpy()
        return logits, seen[0].numpy()
