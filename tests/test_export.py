"""ONNX export: python -m covidxr.export, freshness by checkpoint hash, ONNX Runtime equals PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr.files import file_digest
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.export import main
from covidxr.inference.onnx_backend import SHA_KEY, OnnxRunner
from covidxr.inference.predictor import Predictor

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run's best.pt with its default export best.onnx beside it (made by the CLI)."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = folder / "best.pt"
    shutil.copy(tiny_run / "best.pt", checkpoint)
    assert main(["--checkpoint", str(checkpoint), "--format", "onnx"]) == 0
    assert (folder / "best.onnx").is_file() and not list(folder.glob(".*.tmp"))
    return checkpoint


@pytest.fixture(scope="module")
def xrays(shared_data: Path) -> list[Xray]:
    """Six real X-rays of varied size, two per class."""
    meta = pd.read_csv(shared_data / "metadata.csv").sort_values("bytes")
    return [load_xray(shared_data / p) for p in meta.groupby("label").head(2)["path"]]


def test_export_records_the_checkpoint_and_has_a_dynamic_batch(exported: Path) -> None:
    model = onnx.load(str(exported.with_suffix(".onnx")))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[SHA_KEY] == file_digest(exported)
    assert meta["covidxr.arch"] == "resnet18" and meta["covidxr.img_size"] == "64"
    assert meta["covidxr.classes"] == '["covid", "normal", "pneumonia"]'
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    runner = OnnxRunner(exported.with_suffix(".onnx"))
    for batch in (1, 5):
        assert runner.logits(np.random.default_rng(batch).random((batch, 1, 64, 64))).shape == (batch, 3)


def test_onnx_runtime_gives_the_probabilities_of_pytorch(exported: Path, xrays: list[Xray]) -> None:
    fast = Predictor.from_checkpoint(exported, device="cpu", backend="auto")
    reference = Predictor.from_checkpoint(exported, device="cpu", backend="torch")
    assert fast.backend == "onnx" and reference.backend == "torch"
    batched = zip(fast.predict_batch(xrays), reference.predict_batch(xrays), strict=True)
    single = ((fast.predict(x, cam=None), reference.predict(x, cam=None)) for x in xrays[:2])
    for ours, theirs in [*batched, *single]:
        assert ours.label == theirs.label
        assert max(abs(ours.probs[c] - theirs.probs[c]) for c in fast.classes) <= 1e-4
    explained = fast.predict(xrays[0], cam="gradcam")  # heatmaps always come from torch
    assert explained.heatmap is not None and explained.heatmap.shape == xrays[0].pixels.shape


def test_stale_or_missing_export_is_not_used(exported: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "best.pt"
    shutil.copy(exported, checkpoint)
    assert Predictor.from_checkpoint(checkpoint, backend="auto").backend == "torch"  # no export: auto never exports
    model = onnx.load(str(exported.with_suffix(".onnx")))
    for prop in model.metadata_props:
        if prop.key == SHA_KEY:
            prop.value = "0" * 64
    onnx.save(model, str(checkpoint.with_suffix(".onnx")))
    assert Predictor.from_checkpoint(checkpoint, backend="auto").backend == "torch"
    shutil.copy(exported.with_suffix(".onnx"), checkpoint.with_suffix(".onnx"))
    assert Predictor.from_checkpoint(checkpoint, backend="auto").backend == "onnx"
    assert Predictor.from_checkpoint(checkpoint, backend="torch").backend == "torch"


def test_export_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err and "--help" not in err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "tflite"]) == 2
