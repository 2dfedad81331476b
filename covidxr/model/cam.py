"""Grad-CAM explanations through pytorch-grad-cam: choosing the layer and computing the heatmaps efficiently.

Everything CAM-related is computed by the ``pytorch_grad_cam`` classes listed in :data:`CAM_METHODS`; this module
only chooses the layer and runs them efficiently. Mapping a heatmap back onto the image and drawing it is
:mod:`covidxr.explain.display`; rating methods is :mod:`covidxr.explain.scoring` (``python -m covidxr.explain score``).

Conventions:

* **One forward pass.** :func:`compute_cam` runs the CAM object once; the logits of that same forward pass are read
  from the CAM object (``BaseCAM.forward`` keeps the model outputs in ``self.outputs``), so a prediction with its
  explanation costs one forward and one (short) backward. Without ``targets`` the predicted class (arg-max of those
  logits) is explained, as pytorch-grad-cam does.
* **Backward stops at the target layer** (``efficient=True``, the default). The usual use of pytorch-grad-cam keeps
  every parameter's ``requires_grad``, so autograd records and back-propagates through the whole network although
  CAMs only need the gradient at the target layer. Here the parameters are switched to ``requires_grad=False`` for
  the call (flags restored afterwards) and a forward hook, registered in front of pytorch-grad-cam's own hooks,
  replaces the target layer's output by a fresh graph leaf (``output.detach().requires_grad_(True)``, cloned so that
  an in-place op after the layer, like DenseNet's final ReLU, stays legal). Nothing before the target layer is
  recorded, and the backward only runs through the layers after it. The gradient at the target layer, hence the
  heatmap, is the same as the usual way's (tested to 1e-5).
* **The caller's model is left as it was**: the train/eval flag of every sub-module (``BaseCAM.__init__`` calls
  ``model.eval()``), the parameters' ``requires_grad`` flags and ``.grad`` tensors are restored, and every hook is
  removed (the CAM objects are used as context managers). CAMs are computed with gradients enabled even when the
  caller is inside ``torch.inference_mode()`` or ``torch.no_grad()``.
* **Geometry.** CAMs are computed on the letterboxed network input, ``(B, S, S)``, on pytorch-grad-cam's scale
  (min-max over the whole network input); :func:`covidxr.explain.display.heatmap_on_image` maps them back onto the
  original image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from covidxr.networks.architectures import target_layers
from covidxr.preprocessing.transforms import unletterbox

CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
"""Method names accepted everywhere (``--cam``, ``Predictor.predict(cam=...)``)."""

CAM_CLASSES: MappingProxyType[str, type[BaseCAM]] = MappingProxyType({
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
})
"""The pytorch-grad-cam class behind each method name."""


@dataclass
class CamOutput:
    """What one CAM call produced for a batch.

    Attributes:
        maps: ``(B, S, S)`` float32 heatmaps in ``[0, 1]`` on the network input, as pytorch-grad-cam returns them.
        logits: ``(B, C)`` float32 logits of the same forward pass, detached, on the CPU.
        targets: the class index explained for each image.
    """

    maps: np.ndarray
    logits: torch.Tensor
    targets: list[int]


def cam_class(method: str) -> type[BaseCAM]:
    """Return the pytorch-grad-cam class for a method name.

    Args:
        method: one of :data:`CAM_METHODS` (case-insensitive).

    Returns:
        The class.

    Raises:
        ValueError: for an unknown name.
    """
    key = method.strip().lower()
    if key not in CAM_CLASSES:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return CAM_CLASSES[key]


def resolve_layers(model: nn.Module, layer: str | nn.Module | None = None) -> list[nn.Module]:
    """Return the layers to explain: ``layer`` itself, the sub-module with that dotted name, or the default (the
    last convolutional stage; for a seed ensemble, every member's, whose maps pytorch-grad-cam averages).

    Args:
        model: the classifier (an :class:`~covidxr.networks.architectures.XrayClassifier` or an ensemble of them when
        ``layer`` is
            None).
        layer: None for the default, a dotted module name such as ``"backbone.layer3"``, or a module of ``model``.

    Returns:
        The target modules (one unless the default of an ensemble).

    Raises:
        ValueError: when the name does not name a sub-module of ``model``.
    """
    if layer is None:
        return target_layers(model)
    if isinstance(layer, nn.Module):
        return [layer]
    try:
        return [model.get_submodule(layer)]
    except AttributeError as exc:
        raise ValueError(f"no layer named {layer!r} in the model (dotted module name, e.g. 'backbone.layer4')") from exc


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every sub-module's train/eval flag and every parameter's ``.grad`` on exit.

    Args:
        model: the model whose state is kept.

    Yields:
        Nothing.
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(param, param.grad) for param in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            param.grad = grad


@contextlib.contextmanager
def backward_to_layer(model: nn.Module, layers: Sequence[nn.Module]) -> Iterator[None]:
    """Make autograd start at the ``layers``' outputs: parameters frozen, each output turned into a graph leaf.

    The hook is registered with ``prepend=True``, so pytorch-grad-cam's hooks, registered later, see the leaf.
    It does nothing when gradients are disabled (ScoreCAM's extra forward passes run under ``no_grad``).

    Args:
        model: the model; its parameters' ``requires_grad`` flags are restored on exit.
        layers: the target layers.

    Yields:
        Nothing.
    """

    def start_graph_here(module: nn.Module, args: tuple, output: object) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        # clone(): a leaf that requires grad may not be modified in place; its clone may.
        return output.detach().requires_grad_(True).clone()

    flags = [(param, param.requires_grad) for param in model.parameters()]
    handles = [layer.register_forward_hook(start_graph_here, prepend=True) for layer in layers]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)


def compute_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str = "gradcam",
    targets: Sequence[int] | None = None,
    layer: str | nn.Module | None = None,
    efficient: bool = True,
) -> CamOutput:
    """Explain a batch with one pytorch-grad-cam call: one forward pass gives the logits and the heatmaps.

    Args:
        model: the classifier; it is left in the state it was in (see the module docstring).
        inputs: ``(B, 1, S, S)`` letterboxed images in ``[0, 1]`` (any device; moved to the model's).
        method: one of :data:`CAM_METHODS`.
        targets: class index to explain per image; None explains each image's predicted class.
        layer: target layer (see :func:`resolve_layers`).
        efficient: stop the backward pass at the target layer (:func:`backward_to_layer`); False runs
            pytorch-grad-cam the usual way (the model's ``requires_grad`` flags as they are).

    Returns:
        The heatmaps, the logits of the same forward pass and the explained classes.

    Raises:
        ValueError: unknown method or layer, a negative or out-of-range class index, or ``targets`` not one per image.
    """
    cam_type = cam_class(method)
    modules = resolve_layers(model, layer)
    if targets is not None:
        targets = [int(t) for t in targets]
        if len(targets) != len(inputs) or min(targets, default=0) < 0:
            raise ValueError(f"targets must be one non-negative class index per image, got {targets}")
    device = next(model.parameters()).device
    chosen = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model):
        x = inputs.detach().to(device=device, dtype=torch.float32).clone()  # a normal tensor even if made in inference
        guard = backward_to_layer(model, modules) if efficient else contextlib.nullcontext()
        with guard, cam_type(model=model, target_layers=modules) as cam:
            try:
                maps = cam(input_tensor=x, targets=chosen)
            except IndexError as exc:  # BaseCAM.__exit__ would swallow (and print) an IndexError
                raise ValueError(f"class index out of range for this model: {exc}") from exc
            logits = cam.outputs.detach().float().cpu()
    explained = logits.argmax(dim=1).tolist() if targets is None else targets
    return CamOutput(maps=np.asarray(maps, dtype=np.float32), logits=logits, targets=explained)


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
