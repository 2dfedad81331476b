"""TrainedModel: one checkpoint read once into a typed model; the calibration with its origin as an enum; what is
fitted after training read from sidecars pinned to the checkpoint's SHA-256; the architecture table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covidxr.files import file_digest
from covidxr.inference.gate_fit import fit_ood, fit_view
from covidxr.inference.predictor import Predictor
from covidxr.model.calibration import Calibration, Origin, origin_of
from covidxr.model.calibration_file import calibration_path, write_calibration
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.gate import FRONTAL, InputGate
from covidxr.model.sidecars import gate_path, write_gate
from covidxr.model.trained import TrainedModel
from covidxr.networks.architectures import architecture, build_model, target_layer


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run (no sidecars), so each test writes its own."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("eval*", "*.calibration.json", "*.gate.pt"))
    return folder


def learned_gate(model: TrainedModel) -> InputGate:
    """A gate with learned checks fitted on this network's features of random inputs (enough to round-trip)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((24, 1, model.img_size, model.img_size), dtype=np.float32))
    features = model.run(x, features=True).features
    train = {FRONTAL: features[:12], "rotated": features[:12][:, ::-1].copy() + 5.0}
    view = fit_view(train, C=1.0, min_frontal=0.5, seed=0)
    ood = fit_ood(features[:12], features[12:], k=3, alpha=0.1)
    return InputGate(view, ood, model.weights_sha256, {"n_train": 12}, unavailable=None)


def test_load_gives_a_frozen_network_and_the_runs_facts(run: Path) -> None:
    path = run / "best.pt"
    model = TrainedModel.load(path, device="cpu")
    ckpt = load_checkpoint(path)
    assert model.sha256 == file_digest(path) and model.classes == tuple(ckpt["classes"])
    assert not model.network.training and not any(p.requires_grad for p in model.network.parameters())
    assert model.img_size == 64 and model.arch == "resnet18" and model.config["seed"] == ckpt["config"]["seed"]
    assert "model" not in model.record and "gate" not in model.record  # weights and gate are typed fields
    with pytest.raises(TypeError):
        model.record["arch"] = "other"  # read-only
    with pytest.raises(AttributeError):
        model.classes = ("x",)  # frozen
    out = model.run(torch.zeros(2, 1, 64, 64), features=True, cam="gradcam")
    assert out.logits.shape == (2, len(model.classes)) and out.features.shape == (2, 512)
    assert out.cams.shape == (2, 64, 64) and len(out.cam_targets) == 2
    # the predictor is this model: the same logits
    predictor = Predictor(model)
    assert predictor.classes == list(model.classes) and predictor.checkpoint_sha256 == model.sha256
    assert np.allclose(predictor._logits(torch.zeros(2, 1, 64, 64))[0], out.logits, atol=1e-5)


def test_calibration_origin_is_an_enum_read_from_the_sidecar(run: Path) -> None:
    path = run / "best.pt"
    assert TrainedModel.load(path, device="cpu").calibration == Calibration()  # no sidecar: uncalibrated
    summary = {"operating_points": {"positive": "covid", "points": [{"threshold": 0.3}]}}
    write_calibration(path, file_digest(path), 1.5, "fitted on the run's validation split (9 images)", summary,
                      origin=Origin.VALIDATION.value)
    calibration = TrainedModel.load(path, device="cpu").calibration
    assert calibration.origin is Origin.VALIDATION and calibration.origin.fitted and calibration.temperature == 1.5
    assert calibration.operating_points["positive"] == "covid"
    # a sidecar written before origins were recorded: the origin comes from its sentence, in one place
    record = json.loads(calibration_path(path).read_text())
    del record["temperature_origin"]
    record["temperature_how"] = "fitted out of source, on 3 held-out sources"
    calibration_path(path).write_text(json.dumps(record))
    assert TrainedModel.load(path, device="cpu").calibration.origin is Origin.OUT_OF_SOURCE
    assert origin_of("reused from the checkpoint's calibration (x); not refitted") is Origin.REUSED
    assert not Origin.REUSED.fitted and not Origin.SITE.fitted


def test_a_sidecar_pinned_to_other_bytes_is_refused(run: Path) -> None:
    path = run / "best.pt"
    model = TrainedModel.load(path, device="cpu")
    write_calibration(path, model.sha256, 2.0, "fitted on the run's validation split (9 images)", None,
                      origin="validation")
    write_gate(path, learned_gate(model), model.sha256)
    assert TrainedModel.load(path, device="cpu").gate.learned
    save_checkpoint(path, {**load_checkpoint(path), "epoch": -1})  # retrained in place: other bytes
    again = TrainedModel.load(path, device="cpu")
    assert again.calibration.origin is Origin.NONE and again.calibration.temperature == 1.0
    assert not again.gate.learned  # the gate sidecar names the old bytes: only the file checks run


def test_fitting_the_gate_keeps_the_checkpoint_and_its_calibration(run: Path) -> None:
    path = run / "best.pt"
    model = TrainedModel.load(path, device="cpu")
    write_calibration(path, model.sha256, 1.7, "fitted on the run's validation split (9 images)", None,
                      origin="validation")
    before = path.read_bytes()
    gate = learned_gate(model)
    written = write_gate(path, gate, model.sha256)
    assert written == gate_path(path) == run / "best.gate.pt" and path.read_bytes() == before
    loaded = TrainedModel.load(path, device="cpu")
    assert loaded.sha256 == model.sha256 and loaded.calibration.temperature == 1.7  # the sidecar is not orphaned
    assert loaded.gate.learned and loaded.gate.info == {"n_train": 12}
    x = torch.rand(3, 1, 64, 64)
    features = loaded.run(x, features=True).features
    np.testing.assert_allclose(loaded.gate.ood.distance(features), gate.ood.distance(features), rtol=1e-4)


def test_an_older_checkpoint_with_the_gate_inside_still_reads(run: Path) -> None:
    path = run / "best.pt"
    model = TrainedModel.load(path, device="cpu")
    gate = learned_gate(model)
    save_checkpoint(path, {**load_checkpoint(path), "gate": gate.to_dict(), "temperature": 1.3})  # the old layout
    old = TrainedModel.load(path, device="cpu")
    assert old.gate.learned and old.gate.info == {"n_train": 12}
    assert old.calibration.origin is Origin.CHECKPOINT and old.calibration.temperature == 1.3


def test_the_architecture_table_declares_each_family_once() -> None:
    assert architecture("resnet50") is architecture("resnet18")  # a family entry
    assert architecture("efficientnet_lite0").build is not None  # an exact name before its family's prefix
    assert architecture("efficientnet_b0").build is None
    assert architecture("googlenet").stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert architecture("swin_t").cam_layer is None  # unknown: torchvision's model, its last convolution
    model = build_model("resnet18", 3, "none")
    assert target_layer(model) is model.backbone.layer4[-1]
