"""Lung crop and equalisation as recorded preprocessing: the record, the equalisers, the cache key, one input path for
training, prediction and the app, the lung model inside the checkpoint, and evaluate's Grad-CAM lung share."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_external import external_root, external_subset

from covidxr.checkpoint import load_checkpoint
from covidxr.data.cache import fill_cache
from covidxr.data.dataset import XrayDataset
from covidxr.evaluation.__main__ import main as evaluate_main
from covidxr.evaluation.lung_share import lung_share_summary
from covidxr.inference.predictor import Predictor
from covidxr.io import load_xray
from covidxr.lungs.train import TrainConfig as LungTrainConfig
from covidxr.lungs.train import default_lung_data
from covidxr.lungs.train import run as train_lungs
from covidxr.model_input import PLAIN, InputPipeline, read_lung_entry
from covidxr.preprocess import Preprocess, cache_size, equalize, eval_transform
from covidxr.training.__main__ import main as train_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_lungs(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A small U-Net trained on 12 real films at 64 px for 4 epochs (as tests/test_lungs.py makes one)."""
    out = tmp_path_factory.mktemp("lungs") / "lung-seg.pt"
    cfg = LungTrainConfig(data=str(default_lung_data()), out=str(out), width=8, img_size=64, epochs=4, batch_size=4,
                          lr=1e-2, progress=False)
    train_lungs(cfg, limit=12)
    return out


@pytest.fixture(scope="module")
def crop_run(tiny_lungs: Path, small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 (random init) trained one epoch at 64 px with --lung-crop --equalize clahe."""
    out = tmp_path_factory.mktemp("runs") / "crop"
    assert train_main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "64",
                       "--epochs", "1", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0",
                       "--lung-crop", "--lung-model", str(tiny_lungs), "--equalize", "clahe",
                       "--out", str(out)]) == 0
    return out


def film(shared_data: Path) -> Path:
    return sorted((shared_data / "covid").iterdir())[0]


def test_preprocess_record_round_trip_and_old_records() -> None:
    pre = Preprocess(img_size=64, lung_crop=True, lung_margin=0.1, equalize="hist")
    back = Preprocess.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre and {"lung_crop", "lung_margin", "equalize"} <= set(pre.to_dict())
    old = {"img_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3, "geometry": "letterbox"}  # before this change
    assert Preprocess.from_dict(old) == Preprocess(img_size=64, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert Preprocess.from_dict(old).lung_crop is False and Preprocess.from_dict(old).equalize == "none"


def test_equalisation_variants() -> None:
    ramp = np.linspace(0.3, 0.5, 64 * 64, dtype=np.float32).reshape(64, 64)  # low contrast
    assert equalize(ramp, "none") is ramp
    hist, clahe = equalize(ramp, "hist"), equalize(ramp, "clahe")
    assert hist.dtype == clahe.dtype == np.float32 and hist.shape == clahe.shape == ramp.shape
    assert hist.min() < 0.05 and hist.max() > 0.95  # stretched over the whole range
    assert np.ptp(ramp) < np.ptp(clahe) < np.ptp(hist) + 1e-6  # CLAHE's clip limit stretches less
    with pytest.raises(ValueError, match="unknown equalisation"):
        equalize(ramp, "gamma")
    with pytest.raises(ValueError, match="lung model"):
        InputPipeline(lung_crop=True)


def test_cache_keeps_variants_apart(shared_data: Path, tmp_path: Path) -> None:
    path = str(film(shared_data))
    plain = fill_cache([path], 32, tmp_path, progress=False)
    hist = fill_cache([path], 32, tmp_path, progress=False, pipeline=InputPipeline(equalize="hist"))
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not np.array_equal(plain.images[0], hist.images[0])
    again = fill_cache([path], 32, tmp_path, progress=False, pipeline=InputPipeline(equalize="hist"))
    assert again.reused == 1 and np.array_equal(again.images[0], hist.images[0])
    assert fill_cache([path], 32, tmp_path, progress=False).reused == 1


def test_lung_model_travels_in_the_checkpoint(crop_run: Path, tiny_lungs: Path) -> None:
    ckpt = load_checkpoint(crop_run / "best.pt")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    assert pre.lung_crop and pre.equalize == "clahe" and pre.lung_margin == 0.05
    entry = ckpt["lung_model"]
    assert entry["sha256"] == hashlib.sha256(tiny_lungs.read_bytes()).hexdigest()
    assert {"arch", "img_size", "threshold", "model"} <= set(entry)
    predictor = Predictor.from_checkpoint(crop_run / "best.pt", device="cpu", backend="torch")
    assert predictor.pipeline.lung_crop and predictor.pipeline.key == InputPipeline(
        True, 0.05, "clahe", read_lung_entry(tiny_lungs)).key


def test_same_input_in_training_prediction_and_the_app(crop_run: Path, shared_data: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(crop_run / "best.pt", device="cpu", backend="torch")
    pipeline, size = predictor.pipeline, predictor.preprocess.img_size
    path = str(film(shared_data))
    predicted, prepared = pipeline.network_input(load_xray(path).pixels, size)
    cached = fill_cache([path], cache_size(size), tmp_path, progress=False, pipeline=pipeline).images[0]
    from_cache = XrayDataset([path], [0], cache_size(size), eval_transform(size), [cached])[0][0]
    from_file = XrayDataset([path], [0], cache_size(size), eval_transform(size), None, pipeline)[0][0]
    torch.testing.assert_close(predicted, from_cache, atol=0, rtol=0)
    torch.testing.assert_close(predicted, from_file, atol=0, rtol=0)
    assert not torch.equal(predicted, PLAIN.network_input(load_xray(path).pixels, size)[0])
    # The heatmap comes back on the original image, zero outside the crop the network saw.
    xray = load_xray(path)
    pred = predictor.predict(xray, cam="gradcam")
    assert pred.heatmap.shape == xray.pixels.shape and 0.0 <= pred.lung_share <= 1.0
    outside = np.ones(xray.pixels.shape, dtype=bool)
    outside[prepared.box.slices] = False
    assert not pred.heatmap[outside].any()
    assert "lung_share" in pred.to_dict()


def test_old_checkpoints_predict_as_before(tiny_run: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu", backend="torch")
    assert predictor.pipeline == PLAIN and "lung_model" not in load_checkpoint(tiny_run / "best.pt")


def test_lung_crop_without_a_lung_model_is_one_line(small_manifest: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "none.pt"
    status = train_main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size",
                         "64", "--epochs", "1", "--workers", "0", "--lung-crop", "--lung-model", str(missing),
                         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"no lung model at {missing}: run python -m covidxr.lungs train" in err


def test_evaluate_reports_the_lung_share(crop_run: Path, shared_data: Path, tmp_path: Path) -> None:
    ext = external_subset(external_root(shared_data), tmp_path / "ext", per_class=2)
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(crop_run / "best.pt"), "--external", str(ext), "--bootstrap", "0",
                          "--lung-share-limit", "3", "--workers", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for share in (metrics["lung_share"], metrics["external"][0]["lung_share"]):
        assert {"mean", "median", "n", "method"} <= set(share) and 1 <= share["n"] <= 3
        assert 0.0 <= share["mean"] <= 1.0 and share["method"] == "gradcam of the predicted class"
    assert "inside the lungs" in (out / "report.html").read_text()


def test_lung_share_skipped_without_a_lung_model(tiny_run: Path, small_manifest: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDXR_HOME", str(tmp_path))
    table = pd.read_csv(small_manifest).head(2)
    share = lung_share_summary(tiny_run / "best.pt", table, 2, device="cpu")
    assert share["mean"] is None and share["n"] == 0 and "no lung model at" in share["note"]


def test_explain_score_reports_the_lung_share(crop_run: Path, small_manifest: Path, tmp_path: Path) -> None:
    from covidxr.explain.scoring import score

    summary = score(crop_run / "best.pt", str(small_manifest), "all", ["gradcam"], 2, tmp_path, device="cpu",
                    batch_size=2, percentiles=[50])
    assert list(summary.columns).index("lung_share") < list(summary.columns).index("border_share")
    assert 0.0 <= float(summary.loc[0, "lung_share"]) <= 1.0
