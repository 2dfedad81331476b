"""The scanner-style training augmentation (``--augment style``): the standard one unchanged without it, each step
doing what it says, one definition for loader processes and on-device batches, and the option on the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from covidxr.data.dataset import DeviceBatches
from covidxr.data.loaders import LoaderSettings, RunData, make_loaders
from covidxr.preprocessing.settings import InputSettings
from covidxr.preprocessing.style_augment import STYLE, StyleRanges, apply_style, style_params, style_ranges
from covidxr.preprocessing.transforms import augment_batch, augment_params, train_transform
from covidxr.training.__main__ import main
from covidxr.training.config import TrainConfig, config_from_args, get_args_parser
from covidxr.training.distributed import DistInfo
from covidxr.training.run_files import write_run_files

# Every step off: used with one step switched on at a time.
NEUTRAL = StyleRanges(probability=1.0, gamma=(1.0, 1.0), sharpen_amount=(0.0, 0.0), resample=(1.0, 1.0),
                      noise=(0.0, 0.0))


def _squares(n: int = 3, side: int = 40, seed: int = 0) -> torch.Tensor:
    """(n, 1, side, side) floats in [0, 1] from random bytes."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 1, side, side), dtype=np.uint8)).float() / 255


def _checkerboard(side: int = 32, low: float = 0.3, high: float = 0.7) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    board = torch.where((xx // 2 + yy // 2) % 2 == 0, high, low)
    return board.view(1, 1, side, side).repeat(2, 1, 1, 1)


def _high_frequency_energy(x: torch.Tensor) -> float:
    """Mean squared difference between horizontal and vertical neighbours."""
    return float((x[..., 1:] - x[..., :-1]).pow(2).mean() + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_standard_augmentation_is_unchanged_without_style() -> None:
    """Values of augment_batch before --augment existed (same inputs and seed), and no extra draws without style."""
    out = augment_batch(_squares(), 24, _gen(5))
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), torch.tensor([271.86099, 253.11218, 265.58713]),
                               rtol=0, atol=2e-3)
    torch.testing.assert_close(out[0, 0, ::8, ::8], torch.tensor(
        [[0.1327768, 0.4877171, 0.0517100], [0.6167562, 0.1955204, 0.4180586], [0.3731359, 0.6459579, 0.1042304]]),
        rtol=0, atol=1e-5)
    after_augment, after_params = _gen(5), _gen(5)
    augment_batch(_squares(), 24, after_augment)
    augment_params(3, after_params)
    assert torch.equal(after_augment.get_state(), after_params.get_state())
    # The style draws come after the standard ones: with every style step off the output is the same.
    assert torch.equal(augment_batch(_squares(), 24, _gen(5), style=NEUTRAL), out)
    assert style_ranges("standard") is None and style_ranges("style") == STYLE


def test_style_changes_images_keeps_shape_and_range_and_follows_the_seed() -> None:
    squares = _squares(8)
    plain = augment_batch(squares, 24, _gen(1))
    styled = augment_batch(squares, 24, _gen(1), style=STYLE)
    assert styled.shape == plain.shape == (8, 1, 24, 24) and styled.dtype == torch.float32
    assert 0.0 <= float(styled.min()) and float(styled.max()) <= 1.0
    assert not torch.allclose(styled, plain, atol=1e-3)
    assert torch.equal(styled, augment_batch(squares, 24, _gen(1), style=STYLE))
    assert not torch.allclose(styled, augment_batch(squares, 24, _gen(2), style=STYLE), atol=1e-3)
    assert torch.equal(squares, _squares(8))  # the input is left alone


def test_style_parameters_stay_in_their_ranges_and_each_step_applies_about_half_the_time() -> None:
    p = style_params(4000, _gen(0))
    on = {"gamma": p["gamma"] != 1, "amount": p["amount"] != 0, "resample": p["resample"] != 1, "noise": p["noise"] > 0}
    for name, mask in on.items():
        assert 0.45 < float(mask.double().mean()) < 0.55, name
    assert 0.7 - 1e-9 <= float(p["gamma"].min()) and float(p["gamma"].max()) <= 1.4 + 1e-9
    assert float(p["gamma"][on["gamma"]].log().median()) == pytest.approx(np.log(0.7 * 1.4) / 2, abs=0.03)
    assert -0.6 <= float(p["amount"].min()) and float(p["amount"].max()) <= 1.0
    assert 0.5 <= float(p["sigma"].min()) and float(p["sigma"].max()) <= 1.5
    assert 0.4 <= float(p["resample"].min()) and float(p["resample"].max()) <= 1.0
    assert 0.0 <= float(p["noise"].min()) and float(p["noise"].max()) <= 0.03
    assert all(v.shape == (4000,) and v.dtype == torch.float64 for v in p.values())


def test_gamma_above_one_darkens_mid_greys_and_below_one_lightens_them() -> None:
    grey = torch.full((2, 1, 8, 8), 0.5)
    darker = apply_style(grey, _gen(0), replace(NEUTRAL, gamma=(1.3, 1.3)))
    lighter = apply_style(grey, _gen(0), replace(NEUTRAL, gamma=(0.8, 0.8)))
    torch.testing.assert_close(darker, torch.full_like(grey, 0.5 ** 1.3))
    assert float(lighter.min()) > 0.5
    ends = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8)
    assert torch.equal(apply_style(ends, _gen(0), replace(NEUTRAL, gamma=(1.3, 1.3))), ends)  # black, white stay


def test_blur_lowers_and_sharpening_raises_high_frequency_energy() -> None:
    board = _checkerboard()
    before = _high_frequency_energy(board)
    blurred = apply_style(board, _gen(0), replace(NEUTRAL, sharpen_amount=(-0.6, -0.6)))
    sharpened = apply_style(board, _gen(0), replace(NEUTRAL, sharpen_amount=(1.0, 1.0)))
    assert _high_frequency_energy(blurred) < 0.7 * before
    assert _high_frequency_energy(sharpened) > 1.3 * before
    assert blurred.shape == sharpened.shape == board.shape
    assert 0.0 <= float(sharpened.min()) and float(sharpened.max()) <= 1.0
    flat = torch.full((2, 1, 16, 16), 0.4)
    torch.testing.assert_close(apply_style(flat, _gen(0), replace(NEUTRAL, sharpen_amount=(1.0, 1.0))), flat)


def test_resampling_softens_detail_and_keeps_the_shape() -> None:
    board = _checkerboard()
    soft = apply_style(board, _gen(0), replace(NEUTRAL, resample=(0.5, 0.5)))
    assert soft.shape == board.shape
    assert _high_frequency_energy(soft) < 0.5 * _high_frequency_energy(board)
    flat = torch.full((2, 1, 16, 16), 0.4)
    torch.testing.assert_close(apply_style(flat, _gen(0), replace(NEUTRAL, resample=(0.4, 0.4))), flat)


def test_noise_of_sigma_zero_is_the_identity_and_sigma_sets_its_strength() -> None:
    x = _squares(4, side=16)
    assert torch.equal(apply_style(x, _gen(3), NEUTRAL), x)
    grey = torch.full((4, 1, 64, 64), 0.5)
    noisy = apply_style(grey, _gen(3), replace(NEUTRAL, noise=(0.02, 0.02)))
    assert float((noisy - grey).std()) == pytest.approx(0.02, rel=0.1)
    assert abs(float((noisy - grey).mean())) < 0.002
    assert torch.equal(noisy, apply_style(grey, _gen(3), replace(NEUTRAL, noise=(0.02, 0.02))))


def test_loader_processes_and_device_batches_apply_the_same_style_augmentation() -> None:
    """The per-image transform (torch's default generator, as in loader workers) and the batched path agree."""
    square = _squares(1)[0]
    torch.manual_seed(11)
    per_image = train_transform(24, style=STYLE)(square)
    torch.testing.assert_close(per_image, augment_batch(square[None], 24, _gen(11), style=STYLE)[0], rtol=0, atol=0)
    bytes_ = (_squares(4) * 255).round().to(torch.uint8)[:, 0]
    batches = BatchSampler(SequentialSampler(range(4)), 4, drop_last=False)
    styled = next(iter(DeviceBatches(bytes_, range(4), [0] * 4, batches, 24, augment_seed=7, style=STYLE)))[0]
    plain = next(iter(DeviceBatches(bytes_, range(4), [0] * 4, batches, 24, augment_seed=7)))[0]
    expected = augment_batch(bytes_.unsqueeze(1).float().div(255), 24, _gen(7), style=STYLE)
    torch.testing.assert_close(styled, expected, rtol=0, atol=0)
    assert not torch.allclose(styled, plain, atol=1e-3)


def _run_data(n: int = 6) -> RunData:
    table = pd.DataFrame({"path": [f"x{i}.png" for i in range(n)], "relpath": [f"x{i}.png" for i in range(n)],
                          "label": ["a", "b"] * (n // 2), "patient_id": [f"p{i}" for i in range(n)],
                          "source": ["s"] * n, "split": ["train"] * (n - 2) + ["val", "test"]})
    images = [np.full((40, 40), 17 * i, dtype=np.uint8) for i in range(n)]
    return RunData(table, ["a", "b"], Path("."), images, {})


@pytest.mark.parametrize("mode", ["standard", "style"])
def test_loaders_give_the_train_split_the_configured_augmentation_only(mode: str) -> None:
    settings = LoaderSettings(img_size=24, batch_size=2, workers=0, preprocessing=InputSettings(augment=mode))
    loaders = make_loaders(_run_data(), settings, torch.device("cpu"), epoch_seed=0)
    assert loaders["train"].dataset.transform.style == style_ranges(mode)
    assert not hasattr(loaders["val"].dataset.transform, "style")  # evaluation: a plain resize
    squares = torch.zeros(6, 40, 40, dtype=torch.uint8)
    on_device = make_loaders(_run_data(), settings, torch.device("cpu"), 0, device_images=squares)
    assert on_device["train"].style == style_ranges(mode) and on_device["val"].augment_seed is None


def test_the_command_line_takes_augment_style_and_config_json_records_it(tmp_path: Path) -> None:
    assert TrainConfig().preprocessing.augment == "standard" == LoaderSettings().preprocessing.augment
    cfg = config_from_args(get_args_parser().parse_args(["--augment", "style"]))
    assert cfg.preprocessing.augment == "style" and cfg.loader_settings().preprocessing.augment == "style"
    write_run_files(tmp_path, cfg, _run_data(), DistInfo())
    assert json.loads((tmp_path / "config.json").read_text())["augment"] == "style"
    # --resume keeps the run's own augmentation; runs from before the option read as standard.
    resumed = config_from_args(get_args_parser().parse_args(["--resume", "x.pt"]), cfg.to_dict())
    assert resumed.preprocessing.augment == "style"
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "augment"}
    assert config_from_args(get_args_parser().parse_args(["--resume", "x.pt"]), old).preprocessing.augment == \
        "standard"


def test_an_unknown_augmentation_is_a_one_line_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--augment", "hospital"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("covidxr.train: error:") and "--augment" in err[0]
    with pytest.raises(ValueError, match="unknown augmentation"):
        style_ranges("hospital")
