"""End-to-end training on a real subset: run folder contents, reload, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidxr.data.loaders import LoaderSettings
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.networks.architectures import build_model
from covidxr.training import __main__ as train_cli
from covidxr.training.__main__ import main
from covidxr.training.config import TrainConfig


def test_tiny_run_writes_a_complete_run_folder(tiny_run: Path) -> None:
    for name in ("best.pt", "last.pt", "config.json", "history.csv", "split.csv"):
        assert (tiny_run / name).is_file(), name
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["epoch"]) == [1]
    assert {"train_loss", "val_loss", "val_auc", "val_acc", "val_f1"} <= set(history.columns)
    split = pd.read_csv(tiny_run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["img_size"] == 64


def test_best_checkpoint_reloads_into_the_same_model(tiny_run: Path) -> None:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert ckpt["arch"] == "resnet18"
    assert ckpt["classes"] == ["covid", "normal", "pneumonia"]
    assert ckpt["preprocess"]["img_size"] == 64
    assert "optimizer" not in ckpt  # best.pt is for inference; last.pt carries the optimizer
    model = build_model(ckpt["arch"], len(ckpt["classes"]), "none")
    model.load_state_dict(ckpt["model"])
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert set(load_checkpoint(tiny_run / "last.pt")) >= {"optimizer", "scheduler", "scaler", "rng"}


def _args(manifest: Path, out: Path, epochs: int) -> list[str]:
    return ["--data", str(manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "48",
            "--epochs", str(epochs), "--batch-size", "8", "--workers", "0", "--freeze-epochs", "1",
            "--patience", "0", "--out", str(out)]


@pytest.mark.slow  # three training runs
@pytest.mark.parametrize("augment", ["standard", "style"])
def test_resume_continues_and_matches_an_uninterrupted_run(small_manifest: Path, tmp_path: Path, augment: str) -> None:
    assert main([*_args(small_manifest, tmp_path / "full", 2), "--augment", augment]) == 0
    # Interrupted run: stops after epoch 1, then resumes to epoch 2 from last.pt.
    assert main([*_args(small_manifest, tmp_path / "part", 1), "--augment", augment]) == 0
    assert main(["--resume", str(tmp_path / "part" / "last.pt"), "--epochs", "2"]) == 0
    full, part = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert part["epoch"] == 2 and [r["epoch"] for r in part["history"]] == [1, 2]
    assert part["config"]["augment"] == full["config"]["augment"] == augment
    for key, value in full["model"].items():
        torch.testing.assert_close(part["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert pd.read_csv(tmp_path / "part" / "split.csv").equals(pd.read_csv(tmp_path / "full" / "split.csv"))


@pytest.mark.parametrize(("given", "epochs"), [([], 4), (["--epochs", str(TrainConfig.epochs)], TrainConfig.epochs),
                                              (["--epochs", "2"], 4)])
def test_resume_applies_a_given_epochs_even_when_it_equals_the_default(given: list[str], epochs: int, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # --epochs 20 (the default) used to be taken for "not given" and silently ignored on --resume.
    last = tmp_path / "last.pt"
    save_checkpoint(last, {"arch": "resnet18", "classes": ["a", "b"], "preprocess": {}, "model": {},
                           "config": TrainConfig(epochs=4, lr=0.01).to_dict()})
    started = []
    monkeypatch.setattr(train_cli, "run", lambda cfg, resume: started.append(cfg))
    assert main(["--resume", str(last), "--lr", "0.5", *given]) == 0
    cfg = started[0]
    assert (cfg.epochs, cfg.resume, cfg.lr) == (epochs, str(last), 0.01)  # the run's own settings, but --epochs


def test_loader_settings_have_the_training_defaults() -> None:
    assert TrainConfig().loader_settings() == LoaderSettings()
    assert TrainConfig(batch_size=3, seed=9).loader_settings() == LoaderSettings(batch_size=3, seed=9)


@pytest.mark.parametrize("bad", [["--epochs", "-1"], ["--batch-size", "0"], ["--img-size", "8"],
                                 ["--device", "tpu"]])
def test_impossible_arguments_exit_2(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(bad) == 2
    assert "error" in capsys.readouterr().err


def test_missing_dataset_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data/README.md" in err and len(err.strip().splitlines()) == 1


def test_unknown_architecture_is_one_line_error(small_manifest: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["--data", str(small_manifest), "--arch", "resnet9000", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("covidxr.train: error: unknown architecture 'resnet9000'")


@pytest.mark.slow
def test_compiled_training_saves_plain_weights_that_match_eager(small_manifest: Path, tmp_path: Path) -> None:
    """--compile trains through torch.compile (one compilation on the CPU) and saves the un-compiled model's keys;
    the first epoch's weights agree with an eager run of the same seed."""
    base = ["--freeze-epochs", "0", "--epochs", "1", "--img-size", "32"]
    assert main([*_args(small_manifest, tmp_path / "eager", 1), *base]) == 0
    assert main([*_args(small_manifest, tmp_path / "compiled", 1), *base, "--compile"]) == 0
    eager = load_checkpoint(tmp_path / "eager" / "best.pt")
    compiled = load_checkpoint(tmp_path / "compiled" / "best.pt")
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    assert set(compiled["model"]) == set(eager["model"]) and not any("_orig_mod" in k for k in compiled["model"])
    for key, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][key], value, rtol=1e-3, atol=1e-3, msg=key)


def test_a_run_from_the_data_variable_records_the_manifest_and_evaluates(small_manifest: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Trained from $COVIDXR_DATA (the quickstart's way), the run used to record only the manifest's folder, and
    # evaluate then read that folder as a class-per-folder tree ("the run's data now has classes [...]").
    from covidxr.evaluation.__main__ import main as evaluate_main

    monkeypatch.setenv("COVIDXR_DATA", str(small_manifest))
    out = tmp_path / "run"
    assert main(["--arch", "resnet18", "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8",
                 "--workers", "0", "--no-gate", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(small_manifest.resolve())
    monkeypatch.delenv("COVIDXR_DATA")
    assert evaluate_main(["--checkpoint", str(out / "best.pt"), "--bootstrap", "0", "--lung-share-limit", "0",
                          "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["classes"] == ["covid", "normal", "pneumonia"]
