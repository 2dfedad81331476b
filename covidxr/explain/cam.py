"""Grad-CAM explanations through pytorch-grad-cam, and ``python -m covidxr.explain score`` to rate them.

Everything CAM-related is computed by the ``pytorch_grad_cam`` classes listed in :data:`CAM_METHODS`; this module
only chooses the layer, runs them efficiently and maps their output back onto the original image.

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
* **Geometry.** CAMs are computed on the letterboxed network input and mapped back onto the original ``(H, W)``
  image with :func:`covidxr.preprocess.unletterbox` (the padding is cropped away, then bilinear resizing). Values stay
  on pytorch-grad-cam's scale (min-max over the whole network input, so the maximum inside the image can be below
  1). A heatmap that is not finite or constant over the image gives no heatmap and a note
  ``"no explanation available (...)"``; it is never drawn as a uniformly hot picture.

Scoring (``python -m covidxr.explain score``): for each method and image, pytorch-grad-cam's own faithfulness
metrics with a softmax-probability target for the explained class:

* ``cam_mult_change``: :class:`~pytorch_grad_cam.metrics.cam_mult_image.CamMultImageConfidenceChange`, the change in
  the class probability when the input is multiplied by the heatmap (only the relevant part kept); higher (closer to
  0 or positive) is better.
* ``road_morf_P`` / ``road_lerf_P``: :class:`~pytorch_grad_cam.metrics.road.ROADMostRelevantFirst` /
  ``ROADLeastRelevantFirst`` at percentile ``P``: the change in probability after the most / least relevant pixels
  are replaced by noisy linear imputation. MoRF: lower (a larger drop) is better; LeRF: higher is better.
  ``road_combined`` is the mean over percentiles of ``(LeRF - MoRF) / 2`` as in ``ROADCombined``; higher is better.
* ``border_share``: the share of heatmap mass in the border band, the outer :data:`BORDER_FRACTION` (12.5%) of the
  original image on each side, where burned-in text, markers and collimation edges sit. The band covers 43.75% of the
  image, so a uniform heatmap scores 0.4375. An image whose heatmap has more than half of its mass there
  (``outside_center``) is listed: its explanation points mostly outside the central chest area.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from torch import nn

from covidxr.errors import CovidxrError, DatasetError, ImageReadError
from covidxr.files import atomic_write_text
from covidxr.io import load_xray
from covidxr.models import target_layer
from covidxr.preprocess import network_input, unletterbox
from covidxr.utils import OneLineParser

if typing.TYPE_CHECKING:
    from covidxr.inference.predictor import Predictor

log = logging.getLogger("covidxr.explain")

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

BORDER_FRACTION: float = 0.125
"""Width of the border band, as a fraction of the image's height (top/bottom) and width (left/right)."""

OUTSIDE_CENTER_SHARE: float = 0.5
"""An explanation with more than this share of its mass in the border band is listed as outside the chest."""

ROAD_PERCENTILES: tuple[int, ...] = (20, 50, 80)
"""Percentiles at which ROAD removes pixels, by default."""

CONSTANT_TOLERANCE: float = 1e-6
"""A heatmap whose values span less than this is constant (no explanation)."""

NO_EXPLANATION = "no explanation available ({})"


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


# ------------------------------------------------------------------------------------------------------ computing


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


def resolve_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """Return the layer to explain: ``layer`` itself, the sub-module with that dotted name, or the default.

    Args:
        model: the classifier (an :class:`~covidxr.models.XrayClassifier` when ``layer`` is None).
        layer: None for :func:`covidxr.models.target_layer`, a dotted module name such as
            ``"backbone.layer3"``, or a module of ``model``.

    Returns:
        The target module.

    Raises:
        ValueError: when the name does not name a sub-module of ``model``.
    """
    if layer is None:
        return target_layer(model)
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
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
def backward_to_layer(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Make autograd start at ``layer``'s output: parameters frozen, the output turned into a graph leaf.

    The hook is registered with ``prepend=True``, so pytorch-grad-cam's hooks, registered later, see the leaf.
    It does nothing when gradients are disabled (ScoreCAM's extra forward passes run under ``no_grad``).

    Args:
        model: the model; its parameters' ``requires_grad`` flags are restored on exit.
        layer: the target layer.

    Yields:
        Nothing.
    """

    def start_graph_here(module: nn.Module, args: tuple, output: object) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        # clone(): a leaf that requires grad may not be modified in place; its clone may.
        return output.detach().requires_grad_(True).clone()

    flags = [(param, param.requires_grad) for param in model.parameters()]
    handle = layer.register_forward_hook(start_graph_here, prepend=True)
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
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
        layer: target layer (see :func:`resolve_layer`).
        efficient: stop the backward pass at the target layer (:func:`backward_to_layer`); False runs
            pytorch-grad-cam the usual way (the model's ``requires_grad`` flags as they are).

    Returns:
        The heatmaps, the logits of the same forward pass and the explained classes.

    Raises:
        ValueError: unknown method or layer, a negative or out-of-range class index, or ``targets`` not one per image.
    """
    cam_type = cam_class(method)
    module = resolve_layer(model, layer)
    if targets is not None:
        targets = [int(t) for t in targets]
        if len(targets) != len(inputs) or min(targets, default=0) < 0:
            raise ValueError(f"targets must be one non-negative class index per image, got {targets}")
    device = next(model.parameters()).device
    chosen = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model):
        x = inputs.detach().to(device=device, dtype=torch.float32).clone()  # a normal tensor even if made in inference
        guard = backward_to_layer(model, module) if efficient else contextlib.nullcontext()
        with guard, cam_type(model=model, target_layers=[module]) as cam:
            try:
                maps = cam(input_tensor=x, targets=chosen)
            except IndexError as exc:  # BaseCAM.__exit__ would swallow (and print) an IndexError
                raise ValueError(f"class index out of range for this model: {exc}") from exc
            logits = cam.outputs.detach().float().cpu()
    explained = logits.argmax(dim=1).tolist() if targets is None else targets
    return CamOutput(maps=np.asarray(maps, dtype=np.float32), logits=logits, targets=explained)


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


# ------------------------------------------------------------------------------------------------------- display


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W) array to ``size`` = (width, height) with PIL's antialiased bilinear filter.

    Args:
        array: 2-D float array.
        size: target (width, height).

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


# ------------------------------------------------------------------------------------------------------- scoring


def border_share(heatmap: np.ndarray, fraction: float = BORDER_FRACTION) -> float:
    """Share of the heatmap's mass in the border band (outer ``fraction`` of the height and width on each side).

    Args:
        heatmap: ``(H, W)`` non-negative heatmap on the original image.
        fraction: band width per side, as a fraction of the side.

    Returns:
        The share in ``[0, 1]``; NaN when the heatmap has no mass.
    """
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    total = heat.sum()
    if not total > 0:
        return float("nan")
    height, width = heat.shape
    top, left = int(round(height * fraction)), int(round(width * fraction))
    inner = heat[top : height - top, left : width - left].sum()
    return float((total - inner) / total)


def faithfulness(model: nn.Module, inputs: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                 percentiles: Sequence[int] = ROAD_PERCENTILES, seed: int = 0) -> dict[str, np.ndarray]:
    """Score heatmaps with pytorch-grad-cam's metrics (see the module docstring), one value per image.

    The ROAD imputation adds noise from torch's generator; it runs under a forked RNG seeded with ``seed``, so the
    scores are reproducible and the caller's RNG state is untouched.

    Args:
        model: the classifier (put in eval mode for the call; its state is restored).
        inputs: ``(B, 1, S, S)`` network inputs in ``[0, 1]``.
        maps: ``(B, S, S)`` heatmaps on the network input.
        targets: explained class per image.
        percentiles: ROAD percentiles.
        seed: seed of the ROAD noise.

    Returns:
        ``{"cam_mult_change": (B,), "road_morf_P": (B,), "road_lerf_P": (B,) ..., "road_combined": (B,)}``.
    """
    device = next(model.parameters()).device
    x = inputs.detach().to(device=device, dtype=torch.float32)
    chosen = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    scores: dict[str, np.ndarray] = {}
    with preserved_state(model), torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        torch.manual_seed(seed)
        # The metrics' return_diff=True would run the unperturbed batch again in every call: run it once here.
        outputs = model(x)
        before = np.float32([target(output).cpu().numpy() for target, output in zip(chosen, outputs, strict=True)])
        metrics = {"cam_mult_change": CamMultImageConfidenceChange()}
        for p in percentiles:
            metrics[f"road_morf_{p}"] = ROADMostRelevantFirst(percentile=p)
            metrics[f"road_lerf_{p}"] = ROADLeastRelevantFirst(percentile=p)
        for key, metric in metrics.items():
            scores[key] = metric(x, maps, chosen, model, return_diff=False) - before
    if percentiles:
        pairs = [(scores[f"road_lerf_{p}"] - scores[f"road_morf_{p}"]) / 2 for p in percentiles]
        scores["road_combined"] = np.mean(pairs, axis=0)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in scores.items()}


def select_images(table: pd.DataFrame, split: str, split_table: pd.DataFrame | None,
                  limit: int | None) -> pd.DataFrame:
    """Pick the images to score: the run's ``split`` (or all), then up to ``limit`` spread over the classes.

    Args:
        table: the dataset's manifest (:func:`covidxr.data.manifest.load_manifest`).
        split: ``"test"``, ``"val"`` or ``"all"``.
        split_table: the run's saved split (``relpath``, ``split``), or None when the run has none.
        limit: at most this many images (taken round-robin over the classes, in manifest order), or None for all.

    Returns:
        The chosen rows.

    Raises:
        DatasetError: when a split is asked for and the data is not the run's training data, or nothing is left.
    """
    from covidxr.data.split import apply_split

    if split != "all":
        if split_table is None:
            raise DatasetError(f"--split {split}: the run has no saved split (split.csv); use --split all")
        try:
            table = apply_split(table, split_table)
        except DatasetError as exc:
            raise DatasetError(f"--split {split}: --data is not this run's training data ({exc}); "
                               "use --split all for other data") from exc
        table = table[table["split"] == split]
    table = table.reset_index(drop=True)
    if limit is not None:
        order = table.groupby("label", sort=False).cumcount()
        table = table.assign(_order=order).sort_values(["_order", "label"], kind="stable").head(limit)
        table = table.drop(columns="_order").reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"no images to score in split {split!r}")
    return table


def load_run_split(checkpoint: Path) -> pd.DataFrame | None:
    """Return the run's saved split: ``split.csv`` beside the checkpoint, else the split stored in the checkpoint.

    Args:
        checkpoint: the checkpoint file.

    Returns:
        A table with ``relpath`` and ``split`` columns, or None.
    """
    split_csv = checkpoint.parent / "split.csv"
    if split_csv.is_file():
        return pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    from covidxr.checkpoint import load_checkpoint

    stored = load_checkpoint(checkpoint).get("split")
    return pd.DataFrame(stored) if isinstance(stored, dict) and {"relpath", "split"} <= set(stored) else None


def _score_batch(predictor: Predictor, rows: pd.DataFrame, methods: Sequence[str],
                 percentiles: Sequence[int]) -> list[dict]:
    """Explain and score one batch of manifest rows with every method.

    Args:
        predictor: the loaded run.
        rows: manifest rows (``path``, ``relpath``, ``label``).
        methods: CAM methods.
        percentiles: ROAD percentiles.

    Returns:
        One result dict per (image, method), plus one per unreadable image (with ``error``).
    """
    results, pixels, kept = [], [], []
    for row in rows.itertuples(index=False):
        try:
            pixels.append(load_xray(row.path).pixels)
            kept.append(row)
        except ImageReadError as exc:
            results.append({"relpath": row.relpath, "label": row.label, "error": str(exc)})
    if not kept:
        return results
    size = predictor.preprocess.img_size
    inputs = torch.stack([network_input(p, size) for p in pixels])
    for method in methods:
        start = time.perf_counter()
        out = compute_cam(predictor.model, inputs, method)
        seconds = (time.perf_counter() - start) / len(kept)
        scores = faithfulness(predictor.model, inputs, out.maps, out.targets, percentiles)
        probs = torch.softmax(out.logits / predictor.temperature, dim=1).numpy()
        for i, (row, image) in enumerate(zip(kept, pixels, strict=True)):
            heat, note = heatmap_on_image(out.maps[i], *image.shape)
            share = border_share(heat) if heat is not None else float("nan")
            item = {"relpath": row.relpath, "label": row.label, "method": method,
                    "predicted": predictor.classes[int(np.argmax(probs[i]))],
                    "cam_class": predictor.classes[out.targets[i]], "confidence": float(probs[i].max()),
                    "border_share": share, "outside_center": bool(share > OUTSIDE_CENTER_SHARE),
                    "ms_per_image": 1000.0 * seconds, "note": note or "", "error": ""}
            item |= {k: (float(v[i]) if heat is not None else float("nan")) for k, v in scores.items()}
            results.append(item)
    return results


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per method: counts and mean scores.

    Args:
        scores: the per-image table written to ``explain_scores.csv``.

    Returns:
        The summary table.
    """
    rated = scores[scores["error"] == ""]
    metric_columns = [c for c in rated.columns if c.startswith(("cam_mult", "road_"))]
    rows = []
    for method, group in rated.groupby("method", sort=False):
        explained = group[group["note"] == ""]
        row = {"method": method, "images": len(group), "explained": len(explained)}
        row |= {c: float(explained[c].mean()) for c in metric_columns}
        row |= {"border_share": float(explained["border_share"].mean()),
                "outside_center": int(explained["outside_center"].sum()),
                "ms_per_image": float(group["ms_per_image"].mean())}
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown_table(frame: pd.DataFrame) -> str:
    """Render a small table as GitHub markdown (numbers with 3 decimals).

    Args:
        frame: the table.

    Returns:
        The markdown text.
    """

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


_SCORE_LEGEND = (
    "cam_mult_change: change in the class probability when the image is multiplied by the heatmap (higher is "
    "better). road_morf_P / road_lerf_P: change in probability after replacing the P% most / least relevant pixels "
    "by ROAD's noisy linear imputation (MoRF: lower is better; LeRF: higher is better). road_combined: mean of "
    "(LeRF - MoRF) / 2 over the percentiles (higher is better). border_share: share of heatmap mass in the outer "
    f"{BORDER_FRACTION:.1%} band of each side of the image, where burned-in text and markers sit (a uniform "
    "heatmap gives 0.4375). outside_center: images with more than half of the heatmap mass in that band."
)


def write_reports(out: Path, scores: pd.DataFrame, summary: pd.DataFrame, title: str) -> None:
    """Write ``explain_scores.csv``, ``explain_summary.csv``, ``explain_summary.md`` and ``explain_summary.html``.

    Args:
        out: output folder.
        scores: per-image, per-method table.
        summary: per-method table.
        title: subtitle naming the run and data.
    """
    from covidxr.html_page import Section, paragraph_html, render_html, table_html

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "explain_scores.csv", scores.to_csv(index=False))
    atomic_write_text(out / "explain_summary.csv", summary.to_csv(index=False))
    flagged = scores[(scores["error"] == "") & scores["outside_center"].astype(bool)]
    flagged = flagged[["method", "relpath", "label", "cam_class", "border_share"]]
    failed = scores[scores["error"] != ""][["relpath", "error"]].drop_duplicates()
    md = [f"# Explanation scores\n\n{title}\n\n", _markdown_table(summary), "\n\n", _SCORE_LEGEND, "\n\n",
          "## Heatmaps mostly outside the central chest area\n\n",
          _markdown_table(flagged) if len(flagged) else "None.", "\n"]
    if len(failed):
        md += ["\n## Unreadable images\n\n", _markdown_table(failed), "\n"]
    atomic_write_text(out / "explain_summary.md", "".join(md))
    sections = [Section("Summary per method", table_html(summary.to_dict("records"), list(summary.columns))
                        + paragraph_html(_SCORE_LEGEND)),
                Section("Heatmaps mostly outside the central chest area",
                        table_html(flagged.to_dict("records"), list(flagged.columns)) if len(flagged)
                        else paragraph_html("None."))]
    if len(failed):
        sections.append(Section("Unreadable images", table_html(failed.to_dict("records"), list(failed.columns))))
    atomic_write_text(out / "explain_summary.html", render_html(sections, title="Explanation scores", subtitle=title))


def score(checkpoint: Path, data: str | None, split: str, methods: Sequence[str], limit: int | None, out: Path,
          device: str = "auto", batch_size: int = 8, percentiles: Sequence[int] = ROAD_PERCENTILES) -> pd.DataFrame:
    """Explain and score images of a dataset with several methods, and write the reports.

    Args:
        checkpoint: the run's checkpoint.
        data: dataset folder or manifest (None: ``$COVIDXR_DATA`` or ``data/cxr``).
        split: ``"test"``, ``"val"`` or ``"all"``.
        methods: CAM methods.
        limit: at most this many images.
        out: output folder.
        device: torch device name or ``"auto"``.
        batch_size: images per CAM call.
        percentiles: ROAD percentiles.

    Returns:
        The per-method summary.
    """
    from covidxr.data.manifest import load_manifest, resolve_data_path
    from covidxr.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device=device, backend="torch")
    data_path = resolve_data_path(data)
    table = select_images(load_manifest(data_path), split, load_run_split(Path(checkpoint)), limit)
    log.info("scoring %d image(s) of %s with %s", len(table), data_path, ", ".join(methods))
    results: list[dict] = []
    for start in range(0, len(table), batch_size):
        results += _score_batch(predictor, table.iloc[start : start + batch_size], methods, percentiles)
    columns = ["relpath", "label", "method", "predicted", "cam_class", "confidence", "cam_mult_change",
               *[f"road_{kind}_{p}" for p in percentiles for kind in ("morf", "lerf")],
               *(["road_combined"] if percentiles else []), "border_share", "outside_center", "ms_per_image",
               "note", "error"]
    scores = pd.DataFrame(results).reindex(columns=columns)
    scores[["note", "error", "method"]] = scores[["note", "error", "method"]].fillna("")
    scores["outside_center"] = scores["outside_center"].fillna(False).astype(bool)
    summary = summarise(scores)
    title = f"checkpoint {checkpoint} ({predictor.arch}), data {data_path}, split {split}, {len(table)} image(s)"
    write_reports(out, scores, summary, title)
    return summary


# ----------------------------------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.explain``."""
    parser = OneLineParser(prog="python -m covidxr.explain", description="Grad-CAM explanation tools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sc = commands.add_parser("score", help="rate CAM methods with faithfulness metrics on a dataset",
                             description="Explain images with each method and score the heatmaps with "
                                         "pytorch-grad-cam's CamMultImageConfidenceChange and ROAD metrics, plus "
                                         "the share of heatmap mass in the image border band.")
    sc.add_argument("--checkpoint", required=True, type=Path, help="the run's checkpoint (best.pt)")
    sc.add_argument("--data", help="dataset folder or manifest (default: $COVIDXR_DATA or data/cxr)")
    sc.add_argument("--split", choices=("test", "val", "all"), default="test",
                    help="images of the run's split (needs the run's training data), or all images of --data")
    sc.add_argument("--methods", nargs="+", choices=CAM_METHODS, default=["gradcam", "gradcam++", "eigencam"],
                    metavar="METHOD", help=f"CAM methods ({', '.join(CAM_METHODS)}); default: %(default)s")
    sc.add_argument("--limit", type=int, help="at most N images, spread over the classes")
    sc.add_argument("--out", type=Path, default=Path("explain"), help="output folder (default: %(default)s)")
    sc.add_argument("--road-percentiles", type=int, nargs="+", default=list(ROAD_PERCENTILES), metavar="P",
                    help="percentiles of pixels ROAD removes (default: %(default)s)")
    sc.add_argument("--batch-size", type=int, default=8, help="images per CAM call (default: %(default)s)")
    sc.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 2 usage or data error)."""
    from covidxr.utils import setup_logging

    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        parser.error("--limit and --batch-size must be positive")
    if any(not 0 < p < 100 for p in args.road_percentiles):
        parser.error("--road-percentiles must lie strictly between 0 and 100")
    setup_logging()
    try:
        summary = score(args.checkpoint, args.data, args.split, list(dict.fromkeys(args.methods)), args.limit,
                        args.out, args.device, args.batch_size, args.road_percentiles)
    except (CovidxrError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(_markdown_table(summary))
    print(f"reports in {args.out}: explain_scores.csv, explain_summary.csv, explain_summary.md, explain_summary.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
