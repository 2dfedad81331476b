"""Test-time augmentation: probabilities averaged over views of the input (``covidxr.networks.tta``), and ``evaluate
--tta``
measuring it without touching the checkpoint's calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from covidxr.networks.tta import VIEWS, TTAClassifier, view


class Spy(torch.nn.Module):
    """A fixed linear classifier on the mean of the four image quadrants, so that each view gives other logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return self.linear(torch.stack([q.mean(dim=(1, 2, 3)) for q in quads], dim=1))


def test_the_output_is_the_log_of_the_views_mean_probability() -> None:
    torch.manual_seed(0)
    model, x = Spy(), torch.rand(2, 1, 32, 32)
    expected = torch.stack([torch.softmax(model(view(x, a, s)), 1) for a, s in VIEWS]).mean(0)
    torch.testing.assert_close(torch.softmax(TTAClassifier(model)(x), 1), expected)
    assert not torch.allclose(torch.softmax(model(x), 1), expected)  # the views do change the answer


def test_one_identity_view_is_the_model_itself() -> None:
    torch.manual_seed(1)
    model, x = Spy(), torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(torch.softmax(TTAClassifier(model, ((0.0, 1.0),))(x), 1), torch.softmax(model(x), 1))


def test_views_keep_the_geometry_and_do_not_flip() -> None:
    x = torch.zeros(1, 1, 64, 64)
    x[..., 20:44, 4:20] = 1.0  # a bright block on the left
    for angle, scale in VIEWS:
        out = view(x, angle, scale)
        assert out.shape == x.shape
        assert out[..., :, :32].sum() > 10 * out[..., :, 32:].sum()  # still on the left


def test_evaluate_tta_writes_its_own_folder_and_leaves_the_calibration(tiny_run: Path, tmp_path: Path) -> None:
    from covidxr.evaluation.__main__ import main as evaluate

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "split.csv", "config.json"):
        shutil.copyfile(tiny_run / name, run / name)
    assert evaluate(["--checkpoint", str(run / "best.pt"), "--tta", "--bootstrap", "0", "--workers", "0",
                     "--batch-size", "8", "--gallery", "0", "--lung-share-limit", "0"]) == 0
    metrics = json.loads((run / "eval-tta" / "metrics.json").read_text())
    assert metrics["reproducibility"]["test_time_augmentation"]["views"] == [list(v) for v in VIEWS]
    assert any(w.startswith("--tta") for w in metrics["warnings"])
    assert not (run / "best.calibration.json").exists() and not (run / "eval").exists()
