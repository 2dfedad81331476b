"""One trained model, loaded once: :class:`TrainedModel` is everything a checkpoint file and its sidecars say about a
network, read and checked in one place, and its one way to run.

>>> model = TrainedModel.load("runs/qs/best.pt", device="cpu")
>>> out = model.run(batch, features=True, cam="gradcam")        # logits, pooled features, heat maps
>>> probs = softmax(out.logits, model.calibration.temperature)
>>> verdicts = model.verdicts(xrays, out.features)               # the input gate

What it holds: the network (eval mode, no parameter requires grad, on ``device``), the class names, the frozen
preprocessing record and input pipeline (with the lung model the checkpoint carries), the :class:`Calibration`
(temperature, thresholds and their :class:`~covidxr.model.calibration.Origin`), the input gate, the site profile if
one was asked for, the SHA-256 of the checkpoint file, and the rest of the training record (configuration, data,
split, history) as a read-only mapping. Nothing outside :mod:`covidxr.model` (and training's own save and resume)
handles the checkpoint dictionary.

What is fitted after training (temperature, thresholds, gate) is read from sidecars pinned to the checkpoint's SHA-256
(:mod:`covidxr.model.sidecars`); a gate inside an older checkpoint is still read there, in one place.

Precision: :meth:`TrainedModel.run` and :meth:`TrainedModel.run_loader` run in float32 on every device (no autocast),
so the probabilities of the report (evaluation) and of the app (the predictor) are the same numbers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from covidxr.files import file_digest
from covidxr.images.reader import Xray
from covidxr.lungs import LungModel, cam_share_in_lungs
from covidxr.model.build import architecture_name, model_from_checkpoint, read_preprocess
from covidxr.model.calibration import Calibration, Origin
from covidxr.model.calibration_file import read_calibration
from covidxr.model.cam import compute_cam, heatmap_on_image
from covidxr.model.checkpoint import load_checkpoint
from covidxr.model.gate import GateVerdict, InputGate, weights_sha256
from covidxr.model.input_pipeline import InputPipeline, Prepared, pipeline_from_checkpoint
from covidxr.model.sidecars import read_gate
from covidxr.model.site_profile import SiteProfile, apply_profile, read_profile, site_gate
from covidxr.networks.architectures import Classifier
from covidxr.networks.batches import EpochOutput, collect, progress_bar
from covidxr.networks.tta import TTAClassifier
from covidxr.preprocessing.transforms import Preprocess
from covidxr.utils import pick_device

# Entries of the checkpoint that are not part of the record a TrainedModel exposes: the weights and what is read into
# typed fields.
_NOT_RECORD = ("model", "gate", "temperature", "evaluation", "calibration_record")


@dataclass(frozen=True)
class ModelOutput:
    """What one :meth:`TrainedModel.run` gives for a batch of ``B`` films.

    Attributes:
        logits: ``(B, C)`` float32 logits.
        features: ``(B, F)`` float32 pooled backbone features (the head's input), or None when not asked for.
        cams: ``(B, S, S)`` heat maps on the network input in ``[0, 1]``, or None.
        cam_targets: the class explained per film, or None.
    """

    logits: np.ndarray
    features: np.ndarray | None = None
    cams: np.ndarray | None = None
    cam_targets: list[int] | None = None


@dataclass(frozen=True)
class FilmHeat:
    """A heat map on one original film and the share of its mass inside the lungs.

    Attributes:
        heat: ``(H, W)`` float32 heat map in ``[0, 1]``, or None when there is no explanation (``note`` says why).
        note: why there is no heat map, or None.
        lung_share: the share of the heat map's mass inside the lung mask, or None (no heat map or no mask).
    """

    heat: np.ndarray | None
    note: str | None
    lung_share: float | None


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained classifier read from its checkpoint and sidecars (see the module docstring); build it with
    :meth:`load`."""

    path: Path
    sha256: str
    network: Classifier
    classes: tuple[str, ...]
    arch: str
    preprocess: Preprocess
    pipeline: InputPipeline
    calibration: Calibration
    gate: InputGate
    device: torch.device
    record: Mapping[str, Any]
    site: SiteProfile | None = None
    gate_network: Classifier | None = None
    weights_sha256: str = ""
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto",
             site: str | os.PathLike | SiteProfile | None = None) -> TrainedModel:
        """Read a checkpoint, its calibration and gate sidecars and (optionally) a site profile.

        Args:
            path: the checkpoint file (``RUN/best.pt``).
            device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ... or a torch device.
            site: a site profile of this checkpoint (its folder, or one already read); an adapted profile's
                statistics and priors go into the network, and the gate keeps reading the unadapted network.

        Raises:
            CheckpointError: missing, unsafe or invalid checkpoint (one line).
            SiteProfileError: a site profile made for another checkpoint, or damaged.
            CovidxrError: the device is not available.
        """
        path = Path(path)
        source = str(path)
        ckpt = load_checkpoint(path)
        sha = file_digest(path)
        torch_device = device if isinstance(device, torch.device) else pick_device(device)
        preprocess = read_preprocess(ckpt, source)
        pipeline = pipeline_from_checkpoint(ckpt.get("lung_model"), preprocess, source)
        stored = read_calibration(path, sha)
        calibration = (Calibration.from_sidecar(stored, str(path)) if stored is not None
                       else Calibration.from_checkpoint_entries(ckpt.get("temperature"), ckpt.get("evaluation"),
                                                                source))
        weights = weights_sha256(ckpt["model"])
        gate = read_gate(path, sha, ckpt.get("gate"), weights, source)
        profile = read_profile(site, sha) if isinstance(site, (str, os.PathLike)) else site
        adapted = apply_profile(ckpt, profile)
        if profile is not None and profile.adapted:
            gate = site_gate(gate, profile.gate_reference)  # the site's ordinary films leave "read with care"
        network = _frozen(model_from_checkpoint(adapted, source), torch_device)
        gate_network = None
        if adapted is not ckpt:
            calibration = Calibration(adapted["temperature"], Origin.SITE,
                                      f"the site profile {profile.name}'s temperature", calibration.summary)
            if gate.learned:  # the gate was fitted on the unadapted network's features
                gate_network = _frozen(model_from_checkpoint(ckpt, source), torch_device)
        record = MappingProxyType({k: v for k, v in ckpt.items() if k not in _NOT_RECORD})
        return cls(path=path, sha256=sha, network=network, classes=tuple(ckpt["classes"]),
                   arch=architecture_name(ckpt), preprocess=preprocess, pipeline=pipeline, calibration=calibration,
                   gate=gate, device=torch_device, record=record, site=profile, gate_network=gate_network,
                   weights_sha256=weights)

    # ------------------------------------------------------------------------------------------------ facts

    @property
    def config(self) -> Mapping[str, Any]:
        """The run's settings (``TrainConfig.to_dict``); empty for a checkpoint without them."""
        return self.record.get("config") or {}

    @property
    def img_size(self) -> int:
        """The network input side ``S``."""
        return int(self.preprocess.img_size)

    @property
    def adapted(self) -> bool:
        """Whether a site profile's statistics and priors are in the network."""
        return self.site is not None and self.site.adapted

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights, on the CPU (for an ensemble of checkpoints)."""
        return {k: v.detach().cpu() for k, v in self.network.state_dict().items()}

    # --------------------------------------------------------------------------------------------------- run

    def run(self, inputs: torch.Tensor, *, features: bool = False, cam: str | None = None,
            cam_targets: Sequence[int] | None = None, cam_layer: str | None = None, tta: bool = False) -> ModelOutput:
        """Run a batch of network inputs through the network once.

        Args:
            inputs: ``(B, 1, S, S)`` prepared films in ``[0, 1]`` (:meth:`InputPipeline.network_input`).
            features: also return the pooled backbone features of the same pass (what the gate reads; under a site
                profile, the unadapted network's).
            cam: a Grad-CAM method (:data:`covidxr.model.cam.CAM_METHODS`), or None for no heat maps.
            cam_targets: the class to explain per film (None: each film's predicted class).
            cam_layer: dotted name of the layer to explain (default: the architecture's).
            tta: logits are the log mean probabilities over the views of :data:`covidxr.networks.tta.VIEWS` (a
            measurement of
                ``evaluate --tta``; not with ``cam`` or ``features``).

        Raises:
            ValueError: an unknown CAM method, class or layer.
        """
        if tta:
            if cam is not None or features:
                raise ValueError("test-time augmentation gives logits only (no heat maps, no features)")
            with self._lock, torch.inference_mode():
                return ModelOutput(TTAClassifier(self.network)(inputs.to(self.device)).float().cpu().numpy())
        with self._lock:
            with _head_input(self.network) as seen:
                if cam is None:
                    with torch.inference_mode():
                        logits = self.network(inputs.to(self.device)).float().cpu().numpy()
                    maps = targets = None
                else:
                    out = compute_cam(self.network, inputs, cam, cam_targets, layer=cam_layer)
                    logits, maps, targets = out.logits.numpy(), out.maps, list(out.targets)
            pooled = seen[0].numpy() if features and seen else None
            if features and self.gate_network is not None:
                with torch.inference_mode():
                    pooled = self.gate_network.features(inputs.to(self.device)).float().cpu().numpy()
        return ModelOutput(logits=logits, features=pooled, cams=maps, cam_targets=targets)

    def features(self, inputs: torch.Tensor) -> np.ndarray:
        """``(B, F)`` pooled features the gate reads (the unadapted network's under a site profile)."""
        network = self.gate_network if self.gate_network is not None else self.network
        with self._lock, torch.inference_mode():
            return network.features(inputs.to(self.device)).float().cpu().numpy()

    def run_loader(self, loader: Iterable, desc: str = "predict", progress: bool = True,
                   tta: bool = False) -> EpochOutput:
        """Logits for every sample of a loader of ``(images, targets, indices)`` batches (the evaluation's), as
        :meth:`run` gives them."""
        logits, targets, indices = [], [], []
        for images, target, index in progress_bar(loader, progress, desc=desc):
            logits.append(torch.from_numpy(self.run(images, tta=tta).logits))
            targets.append(target.cpu())
            indices.append(torch.as_tensor(index))
        return collect(0.0, sum(len(t) for t in targets), logits, targets, indices)

    def verdicts(self, xrays: list[Xray], features: np.ndarray | None) -> list[GateVerdict]:
        """The input gate's verdict on each film (``features``: :attr:`ModelOutput.features`, needed when the gate
        has learned checks)."""
        return self.gate.check_batch(xrays, features if self.gate.learned else None)

    def film_heat(self, cam_map: np.ndarray, film: np.ndarray, prepared: Prepared, lungs: LungModel | None = None,
                  mask: np.ndarray | None = None) -> FilmHeat:
        """A network-input heat map on its original film, and its share inside the lungs.

        The lung mask is ``mask`` when given (one computed before), else the pipeline's (a run that crops or masks the
        lungs), else ``lungs``' mask of the film (the fall-back), else none. The heat map is in ``[0, 1]``
        (:func:`covidxr.model.cam.heatmap_on_image` clips it), so no negative mass enters the share
        (:func:`covidxr.lungs.cam_share_in_lungs`). This is the one place the lung share and its fall-back are computed.
        """
        seen = film[prepared.box.slices] if prepared.box is not None else film  # what the network saw
        heat, note = heatmap_on_image(cam_map, *seen.shape)
        heat = self.pipeline.uncrop(heat, prepared, *film.shape)
        if heat is None:
            return FilmHeat(None, note, None)
        if mask is None:
            mask = self.lung_mask(film, prepared, lungs)
        return FilmHeat(heat, note, None if mask is None else cam_share_in_lungs(heat, mask))

    def lung_mask(self, film: np.ndarray, prepared: Prepared, lungs: LungModel | None = None) -> np.ndarray | None:
        """The lung mask of a film: the pipeline's (a run that crops or masks the lungs), else ``lungs``' mask of the
        film, else None."""
        if prepared.mask is not None:
            return prepared.mask
        return lungs.mask(film) if lungs is not None else None


def _frozen(network: Classifier, device: torch.device) -> Classifier:
    network.eval()
    network.requires_grad_(False)
    return network.to(device)


class _head_input:  # noqa: N801 - a context manager used like a function
    """Capture the pooled backbone features of the next forward pass (the head's input), on the CPU; only the first
    pass is kept (Score-CAM runs further passes on masked inputs)."""

    def __init__(self, network: Classifier) -> None:
        self.network = network
        self.seen: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> list[torch.Tensor]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self.seen:
                self.seen.append(args[0].detach().float().cpu())

        self.handles.append(self.network.head.register_forward_pre_hook(hook))
        return self.seen

    def __exit__(self, *_exc: object) -> None:
        for handle in self.handles:
            handle.remove()
