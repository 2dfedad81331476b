"""On-device batch pipeline (``--gpu-cache``) and the feature cache of frozen epochs (``--linear-probe``)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from covidxr.data.dataset import DeviceBatches, XrayDataset
from covidxr.data.loaders import LoaderSettings, RunData, use_device_cache
from covidxr.errors import DatasetError
from covidxr.model.checkpoint import load_checkpoint
from covidxr.networks.architectures import build_model
from covidxr.preprocessing.transforms import (
    affine_grid,
    affine_matrices,
    augment_batch,
    augment_params,
    eval_transform,
    train_transform,
)
from covidxr.training import head_features as features
from covidxr.training.__main__ import main


def _squares(n: int = 6, side: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8))


def _batches(n: int, batch: int) -> BatchSampler:
    return BatchSampler(SequentialSampler(range(n)), batch, drop_last=False)


def test_device_batches_augment_with_shapes_ranges_and_seeded_determinism() -> None:
    images = _squares()
    rows = [5, 0, 2, 3]
    make = lambda seed: DeviceBatches(images, rows, [0, 1, 2, 1], _batches(4, 3), 32, augment_seed=seed)  # noqa: E731
    first = list(make(7))
    assert len(make(7)) == 2 and [b[0].shape for b in first] == [(3, 1, 32, 32), (1, 1, 32, 32)]
    x = torch.cat([b[0] for b in first])
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert torch.equal(torch.cat([b[1] for b in first]), torch.tensor([0, 1, 2, 1]))
    assert torch.equal(torch.cat([b[2] for b in first]), torch.arange(4))
    assert torch.equal(x, torch.cat([b[0] for b in make(7)]))  # same seed, same batch
    assert not torch.allclose(x, torch.cat([b[0] for b in make(8)]))


def test_identity_parameters_give_the_identity_warp() -> None:
    params = {k: torch.tensor([v], dtype=torch.float64) for k, v in
              {"width": 1.0, "height": 1.0, "cx": 0.5, "cy": 0.5, "angle": 0.0, "tx": 0.0, "ty": 0.0}.items()}
    torch.testing.assert_close(affine_matrices(params), torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]],
                                                                     dtype=torch.float64))


def test_augmentation_parameters_stay_in_their_ranges() -> None:
    p = augment_params(2000, torch.Generator().manual_seed(0))
    assert 0.8 ** 0.5 * 0.9 ** 0.5 - 1e-9 <= float(p["width"].min()) and float(p["width"].max()) <= 1.0
    assert bool(((p["cx"] - p["width"] / 2) >= -1e-9).all() and ((p["cx"] + p["width"] / 2) <= 1 + 1e-9).all())
    assert float(p["angle"].abs().max()) <= np.deg2rad(7) + 1e-9
    assert float(p["brightness"].min()) >= 0.85 and float(p["contrast"].max()) <= 1.15
    out = augment_batch(_squares(4).unsqueeze(1).float() / 255, 24, torch.Generator().manual_seed(1))
    assert out.shape == (4, 1, 24, 24)


def test_affine_grid_matches_the_library() -> None:
    theta = affine_matrices(augment_params(5, torch.Generator().manual_seed(3))).float()
    for height, width in ((24, 24), (17, 31)):
        expected = torch.nn.functional.affine_grid(theta, [5, 1, height, width], align_corners=False)
        torch.testing.assert_close(affine_grid(theta, height, width), expected, rtol=0, atol=1e-6)


def test_the_per_image_augmentation_is_the_batched_one() -> None:
    """Loader processes (per image, torch's default generator) and --gpu-cache (per batch) augment alike."""
    square = _squares(1)[0].unsqueeze(0).float() / 255
    torch.manual_seed(11)
    per_image = train_transform(24)(square)
    batched = augment_batch(square.unsqueeze(0), 24, torch.Generator().manual_seed(11))[0]
    assert per_image.shape == (1, 24, 24)
    torch.testing.assert_close(per_image, batched, rtol=0, atol=0)
    torch.manual_seed(12)
    assert not torch.equal(train_transform(24)(square), per_image)


def test_device_evaluation_batches_match_the_dataset_path() -> None:
    images = _squares(5)
    ds = XrayDataset([f"x{i}" for i in range(5)], [0] * 5, 40, eval_transform(32), list(images.numpy()))
    ours = torch.cat([b[0] for b in DeviceBatches(images, range(5), [0] * 5, _batches(5, 2), 32, None)])
    theirs = torch.stack([ds[i][0] for i in range(5)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_head_on_cached_features_equals_the_full_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none").eval()
    images = torch.rand(6, 1, 48, 48)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    loader = [(images[:4], targets[:4], torch.arange(4)), (images[4:], targets[4:], torch.arange(4, 6))]
    feats, ys, idx = features.extract_features(model, reversed(loader), torch.device("cpu"), nullcontext,
                                               progress=False)
    fs = features.assemble(feats, ys, idx, 6)
    out = features.predict_head(model.head, fs, _batches(6, 4), nullcontext)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out.logits), model(images), rtol=1e-4, atol=1e-5)
    assert out.targets.tolist() == targets.tolist() and out.indices.tolist() == list(range(6))
    with pytest.raises(ValueError, match="missing"):
        features.assemble(feats[:2], ys[:2], idx[:2], 6)


def test_linear_probe_on_device_batches_trains_only_the_head(small_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    assert main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "48",
                 "--epochs", "3", "--batch-size", "8", "--workers", "0", "--linear-probe", "--gpu-cache", "on",
                 "--patience", "0", "--out", str(out)]) == 0
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3] and set(history["phase"]) == {"head"}
    ckpt = load_checkpoint(out / "last.pt")
    torch.manual_seed(0)  # the run's seed: the same random backbone
    fresh = build_model("resnet18", 3, "none").state_dict()
    for key, value in ckpt["model"].items():
        if key.startswith("backbone."):
            torch.testing.assert_close(value, fresh[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(ckpt["model"]["head.weight"], fresh["head.weight"])
    assert set(ckpt) >= {"optimizer", "scheduler", "scaler", "rng", "history"}


def _run_args(manifest: Path, out: Path, epochs: int) -> list[str]:
    return ["--data", str(manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "32", "--epochs",
            str(epochs), "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0", "--gpu-cache", "on",
            "--patience", "0", "--out", str(out)]


@pytest.mark.slow  # three training runs
def test_device_batches_keep_resume_equal_to_an_uninterrupted_run(small_manifest: Path, tmp_path: Path) -> None:
    table = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    first = table.groupby("label")["patient_id"].transform(lambda p: p.isin(p.drop_duplicates().iloc[:7]))
    manifest = tmp_path / "tiny.csv"
    table[first].to_csv(manifest, index=False)
    assert main(_run_args(manifest, tmp_path / "full", 2)) == 0
    assert main(_run_args(manifest, tmp_path / "part", 1)) == 0
    assert main(["--resume", str(tmp_path / "part" / "last.pt"), "--epochs", "2"]) == 0
    full, part = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert [r["phase"] for r in part["history"]] == ["full", "full"]
    for key, value in full["model"].items():
        torch.testing.assert_close(part["model"][key], value, rtol=0, atol=1e-6, msg=key)


def test_gpu_cache_on_needs_the_prepared_cache() -> None:
    data = RunData(pd.DataFrame(), ["a", "b"], Path("."), None, {})
    with pytest.raises(DatasetError, match="--no-cache"):
        use_device_cache(LoaderSettings(gpu_cache="on"), data, torch.device("cpu"))
    assert not use_device_cache(LoaderSettings(gpu_cache="auto"), data, torch.device("cpu"))
    cached = RunData(pd.DataFrame(), ["a", "b"], Path("."), [np.zeros((4, 4), np.uint8)], {})
    assert not use_device_cache(LoaderSettings(gpu_cache="auto"), cached, torch.device("cpu"))  # auto: CUDA only
    assert use_device_cache(LoaderSettings(gpu_cache="on"), cached, torch.device("cpu"))
