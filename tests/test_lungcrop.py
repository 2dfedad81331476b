"""Lung crop, lung mask and equalisation as recorded preprocessing: the record, the equalisers, the mask (what it
blacks out, equalisation from inside it), the cache key, one input path for training, prediction and the app, the lung
model inside the checkpoint, and evaluate's Grad-CAM lung share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_external import external_root, external_subset

from covidxr.crossval.__main__ import get_args_parser as crossval_parser
from covidxr.crossval.__main__ import main as crossval_main
from covidxr.crossval.folds import CrossvalConfig
from covidxr.data.cache import fill_cache
from covidxr.data.dataset import XrayDataset
from covidxr.data.loaders import LoaderSettings, input_pipeline
from covidxr.errors import CheckpointError
from covidxr.evaluation.__main__ import main as evaluate_main
from covidxr.evaluation.lung_share import lung_share_summary
from covidxr.images.reader import load_xray
from covidxr.inference.predictor import Predictor
from covidxr.lungs.geometry import dilate_mask
from covidxr.lungs.train import LungTrainConfig, default_lung_data
from covidxr.lungs.train import run as train_lungs
from covidxr.model import input_pipeline as model_input
from covidxr.model.checkpoint import load_checkpoint
from covidxr.model.input_pipeline import PLAIN, InputPipeline, pipeline_from_checkpoint, read_lung_entry
from covidxr.preprocessing.settings import LUNG_MASK_DILATION, InputSettings
from covidxr.preprocessing.transforms import Preprocess, cache_size, equalize, eval_transform
from covidxr.training.__main__ import main as train_main
from covidxr.training.config import TrainConfig, config_from_args, get_args_parser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_lungs(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A small U-Net trained on 12 real films at 64 px for 4 epochs (as tests/test_lungs.py makes one)."""
    out = tmp_path_factory.mktemp("lungs") / "lung-seg.pt"
    cfg = LungTrainConfig(data=str(default_lung_data()), out=str(out), width=8, img_size=64, epochs=4, batch_size=4,
                          lr=1e-2, progress=False)
    train_lungs(cfg, limit=12)
    return out


def _tiny_lung_run(out: Path, manifest: Path, flags: list[str]) -> Path:
    assert train_main(["--data", str(manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "64",
                       "--epochs", "1", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0", *flags,
                       "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def crop_run(tiny_lungs: Path, small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 (random init) trained one epoch at 64 px with --lung-crop --equalize clahe."""
    return _tiny_lung_run(tmp_path_factory.mktemp("runs") / "crop", small_manifest,
                          ["--lung-crop", "--lung-model", str(tiny_lungs), "--equalize", "clahe"])


@pytest.fixture(scope="module")
def mask_run(tiny_lungs: Path, small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 (random init) trained one epoch at 64 px with --lung-mask --equalize hist."""
    return _tiny_lung_run(tmp_path_factory.mktemp("runs") / "mask", small_manifest,
                          ["--lung-mask", "--lung-model", str(tiny_lungs), "--equalize", "hist"])


def film(shared_data: Path) -> Path:
    return sorted((shared_data / "covid").iterdir())[0]


FAKE_ENTRY = {"sha256": "f" * 64}  # a lung model entry for pipelines whose lung model is monkeypatched


def fake_lungs(margin: float, equalize: str, **more: object) -> InputPipeline:
    """A lung-crop pipeline with the fake lung model entry."""
    return InputPipeline(lung_crop=True, lung_margin=margin, equalize=equalize, lung_entry=FAKE_ENTRY, **more)


class FixedMask:
    """A lung model that gives the same mask for every image."""

    def __init__(self, mask: np.ndarray) -> None:
        self.fixed = mask

    def mask(self, image: np.ndarray) -> np.ndarray:
        return self.fixed


def two_lungs(height: int = 100, width: int = 100) -> np.ndarray:
    """Two 60 x 25 'lungs' whose box (margin 0) is the square rows 20-80, columns 20-80."""
    mask = np.zeros((height, width), dtype=bool)
    mask[20:80, 20:45] = mask[20:80, 55:80] = True
    return mask


@pytest.fixture
def fixed_lungs(monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """Every pipeline's lung model gives :func:`two_lungs`."""
    mask = two_lungs()
    monkeypatch.setattr(model_input, "lung_model_of", lambda entry: FixedMask(mask))
    return mask


def ramp_image(seed: int = 0) -> np.ndarray:
    """A (100, 100) image in [0.3, 0.6] (no pixel black), low in contrast."""
    return np.random.default_rng(seed).uniform(0.3, 0.6, (100, 100)).astype(np.float32)


def test_preprocess_record_round_trip_and_old_records() -> None:
    pre = Preprocess(img_size=64, lung_crop=True, lung_margin=0.1, equalize="hist")
    back = Preprocess.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre and {"lung_crop", "lung_margin", "equalize"} <= set(pre.to_dict())
    old = {"img_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3, "geometry": "letterbox"}  # before this change
    assert Preprocess.from_dict(old) == Preprocess(img_size=64, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert Preprocess.from_dict(old).lung_crop is False and Preprocess.from_dict(old).equalize == "none"


def test_lung_mask_record_round_trip_and_records_without_it() -> None:
    pre = Preprocess(img_size=64, lung_mask=True, lung_mask_dilation=0.03, equalize="clahe")
    assert pre.lung_crop  # the mask implies the crop, and is recorded as one
    back = Preprocess.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre and back.lung_mask is True and back.lung_mask_dilation == 0.03
    crop_only = Preprocess(img_size=64, lung_crop=True).to_dict()
    del crop_only["lung_mask"], crop_only["lung_mask_dilation"]  # a lung-crop record made before --lung-mask
    old = Preprocess.from_dict(crop_only)
    assert old.lung_crop is True and old.lung_mask is False and old.lung_mask_dilation == LUNG_MASK_DILATION


def test_lung_mask_blacks_out_what_lies_outside_the_dilated_mask(fixed_lungs: np.ndarray) -> None:
    image = ramp_image()
    crop = fake_lungs(0.0, "none").prepare(image, 60)  # box 60 x 60: letterboxed at 1:1
    masked = fake_lungs(0.0, "none", lung_mask=True, lung_mask_dilation=0.05).prepare(image, 60)
    assert masked.box == crop.box and (crop.box.top, crop.box.bottom, crop.box.left, crop.box.right) == (20, 80, 20, 80)
    assert np.array_equal(crop.square, np.round(image[20:80, 20:80] * 255))  # the crop, unresized
    region = dilate_mask(fixed_lungs[crop.box.slices], 0.05)  # widened by round(0.05 * 60) = 3 pixels
    assert region.sum() > fixed_lungs[crop.box.slices].sum() and not region.all()
    assert not masked.square[~region].any() and crop.square[~region].all()
    assert np.array_equal(masked.square[region], crop.square[region])
    # The gap between the lungs (columns 45-55 of the image, 25-35 of the crop): 3 pixels kept on each side.
    row = masked.square[30]
    assert row[25:28].all() and not row[28:32].any() and row[32:35].all()


@pytest.mark.parametrize("method", ["hist", "clahe"])
def test_lung_mask_equalises_from_the_pixels_inside_it(fixed_lungs: np.ndarray, method: str) -> None:
    image, other = ramp_image(0), ramp_image(0)
    outside = ~fixed_lungs
    outside[20:80, 20:80] &= ~dilate_mask(fixed_lungs[20:80, 20:80], LUNG_MASK_DILATION)
    other[outside] = np.random.default_rng(1).uniform(0.0, 1.0, int(outside.sum()))  # markers, body, borders
    masked = fake_lungs(0.0, method, lung_mask=True)
    crop = fake_lungs(0.0, method)
    # Nothing outside the mask changes the lungs' equalisation (it does without the mask).
    assert np.array_equal(masked.prepare(image, 60).square, masked.prepare(other, 60).square)
    assert not np.array_equal(crop.prepare(image, 60).square, crop.prepare(other, 60).square)
    # Where the outside looks like the inside (noise all over), the mask changes the inside little.
    region = dilate_mask(fixed_lungs[20:80, 20:80], LUNG_MASK_DILATION)
    change = masked.prepare(image, 60).square[region].astype(int) - crop.prepare(image, 60).square[region]
    assert np.abs(change).mean() < 0.03 * 255
    if method == "hist":  # the lungs get the whole range, not the part above the black background's share
        inside = masked.prepare(image, 60).square[region]
        assert inside.min() == 0 and inside.max() == 255 and np.percentile(inside, 25) < 80
        blacked = np.where(fixed_lungs, image, 0.0)[20:80, 20:80]  # equalising after blacking out, as avoided:
        assert equalize(blacked, "hist")[fixed_lungs[20:80, 20:80]].min() > 0.1  # the lungs start above the black


def test_lung_mask_leaves_a_fallen_back_image_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    speck = np.zeros((100, 100), dtype=bool)
    speck[50:52, 50:52] = True  # not a pair of lungs: the box falls back to the whole image
    monkeypatch.setattr(model_input, "lung_model_of", lambda entry: FixedMask(speck))
    image = ramp_image()
    masked = fake_lungs(0.0, "none", lung_mask=True).prepare(image, 100)
    assert masked.box.fell_back and masked.square.all()
    assert np.array_equal(masked.square, fake_lungs(0.0, "none").prepare(image, 100).square)


def test_lung_mask_key_record_and_rebuild_from_the_checkpoint() -> None:
    crop = fake_lungs(0.05, "hist")
    masked = fake_lungs(0.05, "hist", lung_mask=True)
    wider = fake_lungs(0.05, "hist", lung_mask=True, lung_mask_dilation=0.04)
    assert len({crop.key, masked.key, wider.key}) == 3 and "mask=" in masked.key and "mask=" not in crop.key
    assert InputPipeline(lung_entry=FAKE_ENTRY, lung_mask=True).lung_crop  # the mask implies the crop
    with pytest.raises(ValueError, match="a lung crop needs the lung model"):
        InputPipeline(lung_mask=True)
    pre = wider.record(Preprocess(img_size=64))
    assert (pre.lung_crop, pre.lung_mask, pre.lung_mask_dilation, pre.equalize) == (True, True, 0.04, "hist")
    ckpt = {"preprocess": pre.to_dict(), "lung_model": FAKE_ENTRY}
    rebuilt = pipeline_from_checkpoint(ckpt.get("lung_model"), Preprocess.from_dict(ckpt["preprocess"]))
    assert rebuilt == wider and rebuilt.key == wider.key and rebuilt.lung_entry is FAKE_ENTRY
    with pytest.raises(CheckpointError, match="crops to the lungs but the checkpoint has no lung model"):
        pipeline_from_checkpoint(None, pre)
    settings = LoaderSettings(preprocessing=InputSettings(lung_mask=True, lung_mask_dilation=0.04, equalize="hist"),
                              lung_entry=FAKE_ENTRY)
    assert settings.preprocessing.lung_crop and input_pipeline(settings) == wider
    again = LoaderSettings(preprocessing=InputSettings(**rebuilt.input_record()), lung_entry=rebuilt.lung_entry)
    assert input_pipeline(again) == wider


def test_train_and_crossval_accept_lung_mask() -> None:
    args = get_args_parser().parse_args(["--lung-mask", "--lung-mask-dilation", "0.03"])
    cfg = config_from_args(args)
    pre = cfg.preprocessing
    assert (pre.lung_mask, pre.lung_crop, pre.lung_mask_dilation) == (True, True, 0.03)
    assert cfg.loader_settings().preprocessing == pre
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).preprocessing.lung_mask is True
    assert TrainConfig.from_dict({"lung_crop": True}).preprocessing.lung_mask is False  # a config.json from before
    cv = crossval_parser().parse_args(["--by", "source", "--data", "x.csv", "--lung-mask"])
    assert cv.lung_mask and cv.lung_mask_dilation == LUNG_MASK_DILATION
    fold = CrossvalConfig.from_dict({**vars(cv), "out": Path("cv")}).train_config("A", Path("cv/fold-A"))
    pre = fold.preprocessing
    assert pre.lung_mask and pre.lung_crop and pre.lung_mask_dilation == LUNG_MASK_DILATION


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
        lung_crop=True, equalize="clahe", lung_entry=read_lung_entry(tiny_lungs)).key


@pytest.mark.parametrize("run", ["crop_run", "mask_run"])
def test_same_input_in_training_prediction_and_the_app(run: str, shared_data: Path, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    run_dir = request.getfixturevalue(run)
    predictor = Predictor.from_checkpoint(run_dir / "best.pt", device="cpu", backend="torch")
    pipeline, size = predictor.pipeline, predictor.preprocess.img_size
    assert pipeline.lung_crop and pipeline.lung_mask == (run == "mask_run")
    path = str(film(shared_data))
    predicted, prepared = pipeline.network_input(load_xray(path).pixels, size)
    cached = fill_cache([path], cache_size(size), tmp_path, progress=False, pipeline=pipeline).images[0]
    from_cache = XrayDataset([path], [0], cache_size(size), eval_transform(size), [cached])[0][0]
    from_file = XrayDataset([path], [0], cache_size(size), eval_transform(size), None, pipeline)[0][0]
    torch.testing.assert_close(predicted, from_cache, atol=0, rtol=0)
    torch.testing.assert_close(predicted, from_file, atol=0, rtol=0)
    assert not torch.equal(predicted, PLAIN.network_input(load_xray(path).pixels, size)[0])
    if pipeline.lung_mask:  # the crop's part outside the dilated mask is black
        assert not prepared.box.fell_back
        crop_only = replace(pipeline, lung_mask=False)
        assert not torch.equal(predicted, crop_only.network_input(load_xray(path).pixels, size)[0])
        square = pipeline.prepare(load_xray(path).pixels, cache_size(size)).square
        assert np.array_equal(square, cached) and (square == 0).mean() > (
            crop_only.prepare(load_xray(path).pixels, cache_size(size)).square == 0).mean()
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


@pytest.mark.parametrize("flag", ["--lung-crop", "--lung-mask"])
def test_lung_crop_without_a_lung_model_is_one_line(flag: str, small_manifest: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "none.pt"
    status = train_main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size",
                         "64", "--epochs", "1", "--workers", "0", flag, "--lung-model", str(missing),
                         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"no lung model at {missing}: run python -m covidxr.lungs train" in err


def test_crossval_lung_mask_without_a_lung_model_is_one_line(small_manifest: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "none.pt"
    status = crossval_main(["--by", "source", "--data", str(small_manifest), "--lung-mask", "--lung-model",
                            str(missing), "--out", str(tmp_path / "cv")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"no lung model at {missing}: run python -m covidxr.lungs train" in err


def test_lung_mask_run_records_it(mask_run: Path, tiny_lungs: Path) -> None:
    ckpt = load_checkpoint(mask_run / "best.pt")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    assert (pre.lung_crop, pre.lung_mask, pre.lung_mask_dilation, pre.equalize) == (True, True, LUNG_MASK_DILATION,
                                                                                    "hist")
    assert ckpt["lung_model"]["sha256"] == hashlib.sha256(tiny_lungs.read_bytes()).hexdigest()
    config = json.loads((mask_run / "config.json").read_text())
    assert config["lung_mask"] is True and config["lung_crop"] is True


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
    from covidxr.evaluation.film_pass import FilmPass
    from covidxr.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu", backend="torch")
    share = lung_share_summary(predictor, table, 2, FilmPass({}))
    assert share["mean"] is None and share["n"] == 0 and "no lung model at" in share["note"]


def test_explain_score_reports_the_lung_share(crop_run: Path, small_manifest: Path, tmp_path: Path) -> None:
    from covidxr.explain.scoring import score

    summary = score(crop_run / "best.pt", str(small_manifest), "all", ["gradcam"], 2, tmp_path, device="cpu",
                    batch_size=2, percentiles=[50])
    assert list(summary.columns).index("lung_share") < list(summary.columns).index("border_share")
    assert 0.0 <= float(summary.loc[0, "lung_share"]) <= 1.0
