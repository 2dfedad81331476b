"""The lung model: a tiny real training run, its checkpoint, the box/crop/CAM helpers and the CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from covidxr.errors import CheckpointError
from covidxr.lungs import (
    LungBox,
    LungModel,
    cam_share_in_lungs,
    crop_to_lungs,
    default_lung_model_path,
    load_lung_model,
    lung_box,
)
from covidxr.lungs.__main__ import main
from covidxr.lungs.model import metrics_path, read_lung_checkpoint, save_lung_checkpoint
from covidxr.lungs.net import build_net, lite0_encoder_weights
from covidxr.lungs.train import LungTrainConfig, default_lung_data, dice, load_lung_data, run, split_names

TINY_ARCH = {"name": "unet", "width": 4, "depth": 3}


def lung_data() -> Path:
    path = default_lung_data()
    if not (path / "images").is_dir():
        pytest.fail(f"shared lung masks not found at {path}: set COVIDXR_LUNG_DATA (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, dict]:
    """The default network (Lite0 U-Net) trained on 8 real films at 64 px for 12 epochs of 2 steps (2 more films
    validate, 2 are held out)."""
    out = tmp_path_factory.mktemp("lungs") / "lung-seg.pt"
    cfg = LungTrainConfig(data=str(lung_data()), out=str(out), img_size=64, epochs=12, batch_size=4, progress=False)
    return out, run(cfg, limit=12)


def test_split_is_seeded_disjoint_and_complete() -> None:
    names = [f"film{i}" for i in range(175)]
    split = split_names(names, seed=0, test_frac=0.2, val_frac=0.15)
    assert [len(split[k]) for k in ("train", "val", "held_out")] == [119, 21, 35]
    assert sorted(split["train"] + split["val"] + split["held_out"]) == sorted(names)
    assert split == split_names(list(reversed(names)), seed=0, test_frac=0.2, val_frac=0.15)
    assert split["held_out"] != split_names(names, seed=1, test_frac=0.2, val_frac=0.15)["held_out"]


def test_tiny_training_learns_lungs_not_background(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    assert out.is_file() and metrics_path(out).is_file()
    report = json.loads(metrics_path(out).read_text())
    assert report["held_out_dice"]["n"] == 2 and len(report["split"]["train"]) == 8
    model = load_lung_model(out)
    data = load_lung_data(lung_data(), limit=12).subset(report["split"]["held_out"] + report["split"]["val"])
    for image, truth in zip(data.images, data.masks, strict=True):
        mask = model.mask(image)
        assert mask.shape == image.shape and mask.dtype == bool
        inside, outside = mask[truth].mean(), mask[~truth].mean()
        # A model that learned the lungs marks most lung pixels and few others; all-lung, no-lung or an inverted
        # mask give a difference of zero or below.
        assert inside - outside > 0.3, (inside, outside)


def test_trained_checkpoint_is_self_describing_and_safe(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "covidxr-lung-seg" and ckpt["img_size"] == 64
    assert ckpt["arch"] == {"name": "lite0-unet"} == LungTrainConfig().arch_record
    assert ckpt["preprocess"]["geometry"] == "letterbox"
    assert set(ckpt["split"]["held_out"]) == set(metrics["held_out_per_film"])
    assert 0.0 <= metrics["held_out_dice"]["min"] <= metrics["held_out_dice"]["mean"] <= 1.0
    assert metrics["best_epoch"] in range(1, 13) and len(metrics["history"]) == 12


def test_checkpoint_round_trip_gives_the_same_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_net(TINY_ARCH)
    path = tmp_path / "lungs" / "model.pt"
    save_lung_checkpoint(path, {"arch": TINY_ARCH, "img_size": 32, "threshold": 0.5, "model": net.state_dict(),
                                "preprocess": {"geometry": "letterbox", "img_size": 32}})
    assert not list(path.parent.glob(".*.tmp"))
    before = LungModel(net, 32)
    after = LungModel.from_checkpoint(read_lung_checkpoint(path))
    image = np.random.default_rng(0).random((45, 37), dtype=np.float32)
    np.testing.assert_allclose(after.probabilities([image])[0], before.probabilities([image])[0], atol=1e-6)
    assert load_lung_model(path) is load_lung_model(str(path))  # cached per file


@pytest.mark.parametrize("shape", [(50, 40), (17, 90), (64, 64)])
def test_masks_come_back_at_the_image_size(shape: tuple[int, int]) -> None:
    model = LungModel(build_net(TINY_ARCH), 32)
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    assert model.mask(image).shape == shape
    batch = model.masks([image, np.zeros((20, 30), np.uint8), image.T], batch_size=2)
    assert [m.shape for m in batch] == [shape, (20, 30), shape[::-1]]
    assert all(m.dtype == bool for m in batch)


def test_missing_and_foreign_checkpoints_say_how_to_make_one(tmp_path: Path) -> None:
    hint = "run python -m covidxr.lungs train"
    with pytest.raises(CheckpointError, match=f"^no lung model at .*nothing.pt: {hint}$"):
        load_lung_model(tmp_path / "nothing.pt")
    torch.save(build_net(TINY_ARCH).state_dict(), tmp_path / "plain.pt")
    torch.save({"format": "covidxr-checkpoint", "model": {}}, tmp_path / "classifier.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("plain.pt", "classifier.pt", "junk.pt"):
        with pytest.raises(CheckpointError, match=f"^no lung model at .*{name}.*: {hint}$") as info:
            load_lung_model(tmp_path / name)
        assert "\n" not in str(info.value)


def test_default_path_follows_covidxr_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COVIDXR_HOME", str(tmp_path))
    assert default_lung_model_path() == tmp_path / "lungs" / "lung-seg.pt"
    monkeypatch.delenv("COVIDXR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_lung_model_path() == tmp_path / "home" / ".cache" / "covidxr" / "lungs" / "lung-seg.pt"


def two_lungs(height: int = 100, width: int = 100) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[20:70, 15:45] = True  # 1500 px
    mask[25:80, 55:85] = True  # 1650 px: 31.5% of the image together
    return mask


def test_lung_box_spans_both_lungs_with_a_margin() -> None:
    assert lung_box(two_lungs(), margin=0.0) == LungBox(20, 15, 80, 85, False)
    assert lung_box(two_lungs(), margin=0.05) == LungBox(15, 10, 85, 90, False)
    assert lung_box(two_lungs(), margin=0.5) == LungBox(0, 0, 100, 100, False)  # clipped, not a fall-back
    wide = np.zeros((100, 200), dtype=bool)
    wide[20:70, 30:90] = wide[20:70, 110:170] = True
    assert lung_box(wide, margin=0.1) == LungBox(10, 10, 80, 190, False)  # margin per axis


def test_lung_box_ignores_specks_and_a_third_component() -> None:
    mask = two_lungs()
    mask[95:97, 2:4] = True  # 4 px speck in a corner
    mask[2:6, 90:98] = True  # third component, 32 px
    assert lung_box(mask, margin=0.0) == LungBox(20, 15, 80, 85, False)


@pytest.mark.parametrize("case", ["empty", "tiny", "huge", "one lung", "one lung and a speck"])
def test_lung_box_falls_back_to_the_whole_image(case: str) -> None:
    mask = np.zeros((100, 120), dtype=bool)
    if case == "tiny":
        mask[40:50, 30:40] = mask[40:50, 70:80] = True  # 200 px = 1.7%
    elif case == "huge":
        mask[:, :] = True
        mask[:10, :] = False  # 90%
    elif case.startswith("one lung"):
        mask[10:90, 20:50] = True  # 20%, 30 wide and 80 tall
        if case.endswith("speck"):
            mask[50:53, 100:103] = True  # under a tenth of the lung: not the other one
    assert lung_box(mask) == LungBox(0, 0, 100, 120, True)


def test_lung_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="margin"):
        lung_box(two_lungs(), margin=-0.1)
    with pytest.raises(ValueError, match="shape"):
        lung_box(np.zeros((3, 4, 5), dtype=bool))


class FixedMask:
    """Stands in for a LungModel: returns a fixed mask."""

    def __init__(self, mask: np.ndarray) -> None:
        self.fixed = mask

    def mask(self, image: np.ndarray) -> np.ndarray:
        assert image.shape == self.fixed.shape
        return self.fixed


def test_crop_to_lungs_with_a_mask_or_a_model() -> None:
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100) / 1e4
    crop, box = crop_to_lungs(image, two_lungs(), margin=0.05)
    assert box == LungBox(15, 10, 85, 90, False) and crop.shape == (70, 80)
    assert crop[0, 0] == image[15, 10] and crop[-1, -1] == image[84, 89]
    crop2, box2 = crop_to_lungs(image, FixedMask(two_lungs()), margin=0.05)
    assert box2 == box and np.array_equal(crop2, crop)
    whole, fallback = crop_to_lungs(image, np.zeros((100, 100), dtype=bool))
    assert fallback.fell_back and whole.shape == image.shape
    with pytest.raises(ValueError, match="does not match"):
        crop_to_lungs(image, np.zeros((50, 50), dtype=bool))


def test_cam_share_in_lungs_hand_computed() -> None:
    mask = np.array([[True, False], [False, False]])
    assert cam_share_in_lungs(np.array([[1.0, 3.0], [0.0, 0.0]]), mask) == pytest.approx(0.25)
    assert cam_share_in_lungs(np.array([[2.0, 0.0], [0.0, 0.0]]), mask) == pytest.approx(1.0)
    assert cam_share_in_lungs(np.array([[0.0, 1.0], [1.0, 2.0]]), mask) == pytest.approx(0.0)
    assert math.isnan(cam_share_in_lungs(np.zeros((2, 2)), mask))
    # A uniform map resized to the mask's size keeps its mass spread evenly: the share is the lung area share.
    assert cam_share_in_lungs(np.ones((7, 7)), two_lungs()) == pytest.approx(0.315)
    # A 2x2 map whose mass is in the left half, on a 4x4 mask that is the left half: bilinear upsampling keeps
    # the two middle columns at 3/4 and 1/4 of the way, so 10 of 16 weight units are on the left.
    left = np.zeros((4, 4), dtype=bool)
    left[:, :2] = True
    assert cam_share_in_lungs(np.array([[1.0, 0.0], [1.0, 0.0]]), left) == pytest.approx(1.75 / 2.0)


def test_cam_share_rejects_negative_maps() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        cam_share_in_lungs(np.array([[1.0, -0.1], [0.0, 0.0]]), np.ones((2, 2), dtype=bool))


def test_dice_hand_computed() -> None:
    a = np.array([1, 1, 0, 0], dtype=bool)
    assert dice(a, np.array([1, 0, 1, 0], dtype=bool)) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(~a & a, ~a & a) == 1.0


def test_cli_says_one_line_when_the_data_folder_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("covidxr.lungs: error: no lung data at ") and "\n" not in err
    assert not (tmp_path / "m").exists()


def test_cli_says_one_line_when_the_model_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "sheet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"covidxr.lungs: error: no lung model at {tmp_path / 'none.pt'}: run python -m covidxr.lungs train"


def test_lite0_unet_starts_from_imagenet_weights() -> None:
    net = build_net({"name": "lite0-unet"}, pretrained=True)
    weights = lite0_encoder_weights(net.encoder)
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in weights.items())
    with torch.inference_mode():
        assert net.eval()(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
