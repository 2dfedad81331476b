"""Seed ensembles: members trained on one patient split (``--split-from``), combined by ``python -m covidxr.ensemble``
into one checkpoint that the predictor, Grad-CAM, the input gate and evaluate take as any other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.errors import CheckpointError
from covidxr.files import file_digest
from covidxr.images.reader import load_xray
from covidxr.inference.predictor import Predictor
from covidxr.model.calibration_file import write_calibration
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.networks.ensemble import ENSEMBLE, EnsembleClassifier, EnsembleHead
from covidxr.training.ensemble import build_ensemble, combine
from covidxr.training.ensemble import main as ensemble_main

MEMBER_TEMPERATURES = (2.0, 0.7)


@pytest.fixture(scope="module")
def members(tiny_run: Path, small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two runs of one recipe on one patient split: a copy of the tiny run (seed 0) and a second seed trained with
    ``--split-from`` it; each with a calibration sidecar of its own temperature."""
    from covidxr.training.__main__ import main as train

    root = tmp_path_factory.mktemp("members")
    first = root / "s0"
    first.mkdir()
    for name in ("best.pt", "split.csv", "config.json"):
        shutil.copyfile(tiny_run / name, first / name)
    second = root / "s1"
    assert train(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "64",
                  "--epochs", "1", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0", "--no-gate",
                  "--seed", "1", "--split-from", str(first), "--out", str(second)]) == 0
    for run, temperature in zip((first, second), MEMBER_TEMPERATURES, strict=True):
        write_calibration(run / "best.pt", file_digest(run / "best.pt"), temperature, "test", None)
    return [first, second]


@pytest.fixture(scope="module")
def ensemble(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "ens"
    assert ensemble_main([*map(str, members), "--out", str(out), "--no-gate", "--device", "cpu"]) == 0
    return out


def test_split_from_trains_the_second_seed_on_the_first_runs_patient_split(members: list[Path]) -> None:
    first, second = (pd.read_csv(m / "split.csv", dtype=str).set_index("relpath")["split"] for m in members)
    assert first.sort_index().equals(second.sort_index())
    weights = [load_checkpoint(m / "best.pt")["model"] for m in members]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # another seed, other weights


def test_split_from_a_folder_without_a_split_is_one_line(small_manifest: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from covidxr.training.__main__ import main as train

    status = train(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--epochs", "1",
                    "--workers", "0", "--no-gate", "--split-from", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "--split-from" in err and "split.csv" in err and len(err.splitlines()) == 1


def test_the_ensemble_predicts_the_mean_of_its_members_calibrated_probabilities(
        members: list[Path], ensemble: Path, shared_data: Path) -> None:
    paths = sorted((shared_data / "covid").iterdir())[:2] + sorted((shared_data / "normal").iterdir())[:2]
    xrays = [load_xray(p) for p in paths]
    singles = [Predictor.from_checkpoint(m / "best.pt", device="cpu", backend="torch") for m in members]
    assert [p.temperature for p in singles] == list(MEMBER_TEMPERATURES)
    combined = Predictor.from_checkpoint(ensemble / "best.pt", device="cpu", backend="torch")
    expected = np.mean([[list(r.probs.values()) for r in p.predict_batch(xrays)] for p in singles], axis=0)
    got = np.array([list(r.probs.values()) for r in combined.predict_batch(xrays)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert combined.classes == singles[0].classes and combined.arch == "ensemble of 2 resnet18"


def test_grad_cam_of_an_ensemble_averages_every_members_map(ensemble: Path, shared_data: Path) -> None:
    predictor = Predictor.from_checkpoint(ensemble / "best.pt", device="cpu", backend="torch")
    assert isinstance(predictor.model, EnsembleClassifier) and len(predictor.model.members) == 2
    xray = load_xray(sorted((shared_data / "covid").iterdir())[0])
    plain = predictor.predict(xray, cam=None)
    explained = predictor.predict(xray, cam="gradcam")
    assert explained.heatmap is not None and explained.heatmap.shape == xray.pixels.shape
    assert np.isfinite(explained.heatmap).all() and explained.heatmap.max() > 0
    assert explained.probs == pytest.approx(plain.probs, abs=1e-5)


def test_the_ensemble_records_its_members_and_is_a_run_folder(members: list[Path], ensemble: Path) -> None:
    ckpt = load_checkpoint(ensemble / "best.pt")
    record = ckpt["ensemble"]
    assert record["arch"] == "resnet18" and record["members"] == 2
    assert [r["sha256"] for r in record["member_runs"]] == [file_digest(m / "best.pt") for m in members]
    assert [r["temperature"] for r in record["member_runs"]] == list(MEMBER_TEMPERATURES)
    assert (ensemble / "split.csv").read_bytes() == (members[0] / "split.csv").read_bytes()
    assert ckpt["model"]["head.temperatures"].tolist() == pytest.approx(MEMBER_TEMPERATURES)


def test_members_on_other_patient_splits_are_refused(members: list[Path], tmp_path: Path) -> None:
    ckpt = load_checkpoint(members[1] / "best.pt")
    split = dict(ckpt["split"])
    split["split"] = ["test" if s == "train" else "train" if s == "test" else s for s in split["split"]]
    save_checkpoint(tmp_path / "other.pt", {**ckpt, "split": split})
    with pytest.raises(CheckpointError, match="another patient split"):
        combine([members[0], tmp_path / "other.pt"])


@pytest.mark.parametrize(("change", "words"), [
    ({"classes": ["a", "b", "c"]}, "classes differs"),
    ({"arch": "resnet34"}, "architecture differs"),
    ({"arch": ENSEMBLE}, "already an ensemble"),
])
def test_members_of_other_recipes_are_refused_in_one_line(members: list[Path], tmp_path: Path, change: dict,
                                                         words: str, capsys: pytest.CaptureFixture) -> None:
    save_checkpoint(tmp_path / "other.pt", {**load_checkpoint(members[1] / "best.pt"), **change})
    status = ensemble_main([str(members[0]), str(tmp_path / "other.pt"), "--out", str(tmp_path / "ens"),
                            "--no-gate"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ens" / "best.pt").exists()


def test_one_member_is_not_an_ensemble(members: list[Path], capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert ensemble_main([str(members[0]), "--out", str(tmp_path), "--no-gate"]) == 2
    assert "at least two members" in capsys.readouterr().err


def test_an_ensemble_checkpoint_without_its_record_is_refused(ensemble: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(ensemble / "best.pt")
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in ckpt.items() if k != "ensemble"})
    with pytest.raises(CheckpointError, match="ensemble record"):
        Predictor.from_checkpoint(tmp_path / "bad.pt", device="cpu", backend="torch")


def test_the_head_averages_probabilities_not_logits() -> None:
    heads = [torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)]
    head = EnsembleHead(heads, [1.0, 3.0])
    x = torch.randn(4, 4)
    expected = (torch.softmax(heads[0](x[:, :2]), 1) + torch.softmax(heads[1](x[:, 2:]) / 3.0, 1)) / 2
    torch.testing.assert_close(torch.softmax(head(x), 1), expected)
    assert head.in_features == 4 and head.out_features == 3


def test_the_input_gate_is_fitted_on_the_ensembles_features(members: list[Path], shared_data: Path,
                                                             tmp_path: Path) -> None:
    from covidxr.inference.gate_fit import GateOptions, fit_checkpoint

    target = build_ensemble(members, tmp_path / "ens", gate=False, device="cpu")
    laterals = shared_data.parent / "notcxr" / "lateral"
    gate = fit_checkpoint(target, GateOptions(made=20, progress=False), device="cpu", laterals=laterals,
                          ct=laterals.parent / "ct")
    assert gate.learned
    predictor = Predictor.from_checkpoint(target, device="cpu", backend="torch")
    assert predictor.gate.learned
    verdict = predictor.predict(load_xray(sorted((shared_data / "normal").iterdir())[0]), cam=None).gate
    assert verdict is not None and verdict.learned and verdict.ood_distance is not None


def test_evaluate_reports_an_ensemble_on_its_members_test_split_and_names_it(ensemble: Path, members: list[Path],
                                                               tmp_path: Path) -> None:
    from covidxr.evaluation.__main__ import main as evaluate

    run = tmp_path / "ens"
    shutil.copytree(ensemble, run)
    assert evaluate(["--checkpoint", str(run / "best.pt"), "--bootstrap", "20", "--workers", "0",
                     "--batch-size", "8"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    predictions = pd.read_csv(run / "eval" / "predictions.csv", dtype={"relpath": str}, keep_default_na=False)
    split = pd.read_csv(members[1] / "split.csv", dtype=str, keep_default_na=False)
    assert set(predictions["relpath"]) == set(split.loc[split["split"] == "test", "relpath"])
    assert metrics["n_images"] == len(predictions) > 0
    assert (run / "best.calibration.json").is_file()
    assert metrics["model_card"]["model"]["arch"] == "ensemble of 2 resnet18"


def test_an_ensemble_exports_to_onnx_with_the_same_probabilities(ensemble: Path, shared_data: Path,
                                                                 tmp_path: Path) -> None:
    shutil.copyfile(ensemble / "best.pt", tmp_path / "best.pt")
    xray = load_xray(sorted((shared_data / "pneumonia").iterdir())[0])
    eager = Predictor.from_checkpoint(tmp_path / "best.pt", device="cpu", backend="torch").predict(xray, cam=None)
    onnx = Predictor.from_checkpoint(tmp_path / "best.pt", device="cpu", backend="onnx")
    assert onnx.backend == "onnx"
    assert onnx.predict(xray, cam=None).probs == pytest.approx(eager.probs, abs=1e-4)



def test_the_app_shows_an_ensembles_prediction_heat_map_and_name(ensemble: Path, shared_data: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(ensemble / "best.pt"))
    monkeypatch.setenv("COVIDXR_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("COVIDXR_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    film = sorted((shared_data / "covid").iterdir())[0]
    at.file_uploader[0].set_value([(film.name, film.read_bytes(), "application/octet-stream")]).run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Probabilities: ") for c in at.caption)
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert record["model"]["arch"] == "ensemble of 2 resnet18" and record["cam_method"] == "gradcam"
