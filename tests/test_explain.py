"""Grad-CAM explanations: geometry, state left as found, every method, efficient backward, sanity checks, scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from covidxr.explain.__main__ import main
from covidxr.explain.display import heatmap_on_image, overlay
from covidxr.explain.scoring import border_share
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.predictor import Predictor
from covidxr.model.cam import CAM_METHODS, compute_cam
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.trained import TrainedModel
from covidxr.networks.architectures import IMAGENET_MEAN, IMAGENET_STD, XrayClassifier, build_model
from covidxr.preprocessing.transforms import letterbox

GRADIENT_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xrays(shared_data: Path) -> list[Xray]:
    """Six small, non-square real X-rays, two per class."""
    meta = pd.read_csv(shared_data / "metadata.csv")
    chosen = meta[meta["width"] != meta["height"]].sort_values("bytes").groupby("label").head(2)
    return [load_xray(shared_data / p) for p in chosen["path"]]


@pytest.fixture(scope="module")
def trained(tiny_run: Path) -> XrayClassifier:
    return TrainedModel.load(tiny_run / "best.pt", device="cpu").network


def _inputs(xrays: list[Xray], size: int = 64) -> torch.Tensor:
    return torch.stack([letterbox(x.pixels, size) for x in xrays])


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def test_heatmap_on_original_geometry_and_model_left_as_found(tiny_run: Path, xrays: list[Xray]) -> None:
    model = TrainedModel.load(tiny_run / "best.pt", device="cpu").network.requires_grad_(True)
    model.train()
    model.backbone.layer1.eval()  # a mix of modes, as during head-only training
    modes = {name: m.training for name, m in model.named_modules()}
    grad = torch.ones_like(model.head.weight)
    model.head.weight.grad = grad
    with torch.inference_mode():  # the caller's inference mode must not stop Grad-CAM
        out = compute_cam(model, _inputs(xrays[:3]))
    for xray, cam_map in zip(xrays[:3], out.maps, strict=True):
        heat, note = heatmap_on_image(cam_map, *xray.pixels.shape)
        assert note is None and heat is not None
        assert heat.shape == xray.pixels.shape and heat.shape[0] != heat.shape[1]
        assert heat.dtype == np.float32 and np.isfinite(heat).all()
        assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > heat.min()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.requires_grad for p in model.parameters())
    assert model.head.weight.grad is grad and all(p.grad is None for n, p in model.named_parameters()
                                                  if n != "head.weight")
    assert _hook_count(model) == 0
    assert out.logits.shape == (3, 3) and not out.logits.requires_grad


def _tiny_model() -> XrayClassifier:
    """An XrayClassifier with an 8-channel convolutional backbone (ScoreCAM runs one forward per channel)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return XrayClassifier("tiny", backbone, 8, 3, IMAGENET_MEAN, IMAGENET_STD).eval()


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_runs_and_releases_its_hooks(xrays: list[Xray], method: str) -> None:
    model = _tiny_model()  # target_layer(): the last Conv2d for an unknown architecture
    out = compute_cam(model, _inputs(xrays[:2]), method)
    assert out.maps.shape == (2, 64, 64) and out.maps.dtype == np.float32
    assert np.isfinite(out.maps).all() and out.maps.min() >= 0 and out.maps.max() <= 1 + 1e-6
    assert out.targets == out.logits.argmax(dim=1).tolist()
    assert _hook_count(model) == 0 and not model.training and all(p.requires_grad for p in model.parameters())


def test_target_layer_can_be_named(trained: XrayClassifier, xrays: list[Xray]) -> None:
    x = _inputs(xrays[:1])
    default = compute_cam(trained, x)
    same = compute_cam(trained, x, layer="backbone.layer4.1")
    earlier = compute_cam(trained, x, layer="backbone.layer2")
    np.testing.assert_array_equal(default.maps, same.maps)
    assert np.abs(default.maps - earlier.maps).max() > 0.05
    with pytest.raises(ValueError, match="no layer named"):
        compute_cam(trained, x, layer="backbone.layer9")
    assert _hook_count(trained) == 0


@pytest.mark.parametrize("arch", ["trained-resnet18", "densenet121", "mobilenet_v3_small"])
def test_efficient_backward_gives_the_usual_heatmaps(tiny_run: Path, xrays: list[Xray], arch: str) -> None:
    if arch.startswith("trained"):
        model, methods = TrainedModel.load(tiny_run / "best.pt", device="cpu").network, GRADIENT_METHODS
    else:  # DenseNet applies an in-place ReLU after its target layer
        torch.manual_seed(0)
        model, methods = build_model(arch, 3, "none").eval(), ("gradcam",)
    model.requires_grad_(True)  # the usual way needs the parameters to require grad
    x = _inputs(xrays[:2])
    for method in methods:
        usual = compute_cam(model, x, method, efficient=False)
        fast = compute_cam(model, x, method, efficient=True)
        assert np.abs(usual.maps - fast.maps).max() <= 1e-5, method
        torch.testing.assert_close(usual.logits, fast.logits, rtol=0, atol=1e-6)
        assert usual.targets == fast.targets
    assert all(p.requires_grad for p in model.parameters()) and _hook_count(model) == 0


def test_explaining_another_class_gives_another_map(trained: XrayClassifier, xrays: list[Xray]) -> None:
    x = _inputs(xrays)
    maps = [compute_cam(trained, x, targets=[c] * len(xrays)) for c in range(3)]
    assert [m.targets for m in maps] == [[c] * len(xrays) for c in range(3)]
    compared = 0
    for i, xray in enumerate(xrays):
        heat = [heatmap_on_image(m.maps[i], *xray.pixels.shape)[0] for m in maps]
        for a in range(3):
            for b in range(a + 1, 3):
                if heat[a] is not None and heat[b] is not None:  # a class may have no explanation (constant map)
                    assert np.abs(heat[a] - heat[b]).max() > 0.05, (i, a, b)
                    compared += 1
    assert compared >= 12
    with pytest.raises(ValueError, match="class index"):
        compute_cam(trained, x, targets=[5] * len(xrays))


def test_constant_or_nan_heatmap_gives_no_explanation(tiny_run: Path, tmp_path: Path, xrays: list[Xray]) -> None:
    assert heatmap_on_image(np.zeros((64, 64), np.float32), 100, 80) == (
        None, "no explanation available (constant heatmap)")
    heat, note = heatmap_on_image(np.full((64, 64), np.nan, np.float32), 100, 80)
    assert heat is None and note.startswith("no explanation available (")
    # A head with zero weights: every gradient is zero, so Grad-CAM is constant.
    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["model"] = {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in ckpt["model"].items()}
    save_checkpoint(tmp_path / "flat.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    result = Predictor.from_checkpoint(tmp_path / "flat.pt", backend="torch").predict(xrays[0], cam="gradcam")
    assert result.heatmap is None and result.note == "no explanation available (constant heatmap)"
    assert result.cam_method == "gradcam" and math.isclose(sum(result.probs.values()), 1.0, rel_tol=1e-9)
    grey = overlay(xrays[0].pixels, result.heatmap)  # no heatmap: the plain picture, never an all-red one
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_dicom_gives_heatmap_and_overlay_at_its_pixel_size(tiny_run: Path, shared_dicom_dir: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_run / "best.pt", backend="torch")
    files = sorted(shared_dicom_dir.glob("*.dcm"))
    assert files
    for file in files:
        xray = load_xray(file)
        result = predictor.predict(xray, cam="gradcam")
        assert xray.format == "DICOM" and result.heatmap is not None
        assert result.heatmap.shape == xray.pixels.shape == (1024, 1024)
        rgb = overlay(xray.pixels, result.heatmap)
        assert rgb.shape == (1024, 1024, 3) and rgb.dtype == np.uint8
        assert (rgb[..., 0] != rgb[..., 2]).any()  # coloured
        assert overlay(xray.pixels, result.heatmap, max_side=512).shape == (512, 512, 3)


def test_overlay_caps_the_longest_side_and_keeps_the_aspect() -> None:
    image = np.random.default_rng(0).random((1500, 2000), dtype=np.float32)
    heat = np.linspace(0, 1, 1500 * 2000, dtype=np.float32).reshape(1500, 2000)
    assert overlay(image, heat).shape == (768, 1024, 3)
    assert overlay(image[:300, :200], heat[:300, :200]).shape == (300, 200, 3)
    with pytest.raises(ValueError, match="differs"):
        overlay(image, heat[:10])


def test_model_randomisation_changes_the_heatmaps(trained: XrayClassifier, xrays: list[Xray]) -> None:
    """Adebayo et al.'s sanity check: an explanation must depend on the learned weights."""
    x = _inputs(xrays)
    explained = compute_cam(trained, x)
    torch.manual_seed(1234)
    random_model = build_model(trained.arch, trained.num_classes, "none").eval()
    randomised = compute_cam(random_model, x, targets=explained.targets)
    rhos = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(explained.maps, randomised.maps, strict=True)]
    assert len(rhos) == 6 and np.nanmean(rhos) < 0.5 and np.nanmax(rhos) < 0.95, rhos


def test_border_share() -> None:
    heat = np.zeros((80, 80), np.float32)
    heat[35:45, 35:45] = 1
    assert border_share(heat) == 0.0
    heat[:] = 0
    heat[:5, :] = 1
    assert border_share(heat) == 1.0
    assert border_share(np.ones((80, 80))) == pytest.approx(1 - 0.75**2)
    assert math.isnan(border_share(np.zeros((8, 8))))


# pytorch_grad_cam's ROAD calls np.argwhere on a torch tensor, which NumPy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
def test_score_cli_writes_its_tables(tiny_run: Path, small_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    status = main(["score", "--checkpoint", str(tiny_run / "best.pt"), "--data", str(small_manifest), "--split",
                   "test", "--methods", "gradcam", "eigencam", "--limit", "6", "--out", str(out)])
    assert status == 0
    scores = pd.read_csv(out / "explain_scores.csv", keep_default_na=False)
    assert len(scores) == 12 and sorted(set(scores["method"])) == ["eigencam", "gradcam"]
    assert scores.groupby("method")["relpath"].nunique().tolist() == [6, 6]
    split = pd.read_csv(tiny_run / "split.csv")
    assert set(scores["relpath"]) <= set(split.loc[split["split"] == "test", "relpath"])
    for column in ("cam_mult_change", "road_morf_20", "road_lerf_80", "road_combined", "border_share"):
        values = pd.to_numeric(scores[column])
        assert values.notna().all() and np.isfinite(values).all(), column
    assert scores["border_share"].astype(float).between(0, 1).all()
    summary = pd.read_csv(out / "explain_summary.csv")
    assert list(summary["method"]) == ["gradcam", "eigencam"] and (summary["images"] == 6).all()
    markdown = (out / "explain_summary.md").read_text()
    assert "| gradcam |" in markdown and "central chest area" in markdown
    assert "<table>" in (out / "explain_summary.html").read_text()


def test_score_cli_refuses_a_split_of_other_data(tiny_run: Path, shared_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["score", "--checkpoint", str(tiny_run / "best.pt"), "--data", str(shared_data), "--split", "test",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "not this run's training data" in err and "\n" not in err and "--help" not in err
