"""The predictor (checkpoint round trip, one forward pass, refusals) and python -m covidxr.predict."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from covidxr.errors import CheckpointError
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.__main__ import main
from covidxr.inference.predictor import Prediction, Predictor
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.input_pipeline import PLAIN
from covidxr.networks.architectures import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xrays(shared_data: Path) -> list[Xray]:
    """Three small real X-rays, one per class."""
    meta = pd.read_csv(shared_data / "metadata.csv")
    chosen = meta.sort_values("bytes").groupby("label").head(1)
    return [load_xray(shared_data / p) for p in chosen["path"]]


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu", backend="torch")


def _save_variant(tiny_run: Path, path: Path, **changes: object) -> Path:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt.update(changes)
    save_checkpoint(path, ckpt)
    return path


def _reference_probs(tiny_run: Path, pixels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    model = build_model(ckpt["arch"], len(ckpt["classes"]), "none")
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        logits = model.eval()(PLAIN.network_input(pixels, ckpt["preprocess"]["img_size"])[0][None])
    return torch.softmax(logits.double() / temperature, dim=1)[0].numpy()


def test_predictor_round_trip_from_a_run(tiny_run: Path, predictor: Predictor, xrays: list[Xray]) -> None:
    path = tiny_run / "best.pt"
    assert predictor.arch == "resnet18" and predictor.classes == ["covid", "normal", "pneumonia"]
    assert predictor.preprocess.img_size == 64 and predictor.temperature == 1.0 and predictor.backend == "torch"
    assert predictor.checkpoint_path == path
    assert predictor.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert predictor.metrics is None
    info = predictor.info
    assert info["arch"] == "resnet18" and info["img_size"] == 64 and info["epoch"] == 1
    assert info["config"]["img_size"] == 64 and info["data"]["n_images"] > 0
    assert set(info["data"]["split_counts"]) == {"train", "val", "test"}
    result = predictor.predict(xrays[0], cam=None)
    assert isinstance(result, Prediction) and result.name == xrays[0].name and result.heatmap is None
    assert result.cam_method is None and result.cam_class is None and result.note is None
    probs = np.array([result.probs[c] for c in predictor.classes])
    np.testing.assert_allclose(probs, _reference_probs(tiny_run, xrays[0].pixels), atol=1e-6)
    assert result.label == predictor.classes[int(probs.argmax())] and result.confidence == result.probs[result.label]
    explained = predictor.predict(xrays[0], name="upload.png")
    assert explained.name == "upload.png" and explained.cam_method == "gradcam"
    assert explained.cam_class == explained.label and explained.heatmap.shape == xrays[0].pixels.shape
    assert all(math.isclose(explained.probs[c], result.probs[c], abs_tol=1e-6) for c in predictor.classes)
    as_dict = explained.to_dict()
    assert "heatmap" not in as_dict and json.loads(json.dumps(as_dict)) == as_dict


def test_temperature_from_the_checkpoint(tiny_run: Path, tmp_path: Path, xrays: list[Xray]) -> None:
    warm = Predictor.from_checkpoint(_save_variant(tiny_run, tmp_path / "t.pt", temperature=2.0), backend="torch")
    assert warm.temperature == 2.0
    result = warm.predict(xrays[1], cam=None)
    expected = _reference_probs(tiny_run, xrays[1].pixels, temperature=2.0)
    np.testing.assert_allclose([result.probs[c] for c in warm.classes], expected, atol=1e-6)
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor.from_checkpoint(_save_variant(tiny_run, tmp_path / "bad.pt", temperature=-1.0))


@pytest.mark.parametrize(("changes", "message"), [
    ({"arch": "resnet34"}, "do not fit resnet34 with 3 classes"),
    ({"classes": ["covid", "normal"]}, "do not fit resnet18 with 2 classes"),
    ({"arch": "no_such_net"}, "unknown architecture"),
    ({"classes": ["a", "a", "b"]}, "distinct"),
])
def test_mismatched_checkpoints_are_refused_in_one_line(tiny_run: Path, tmp_path: Path, changes: dict,
                                                        message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as caught:
        Predictor.from_checkpoint(_save_variant(tiny_run, tmp_path / "variant.pt", **changes))
    assert "\n" not in str(caught.value)


def test_one_forward_pass_per_call(predictor: Predictor, xrays: list[Xray]) -> None:
    calls: list[int] = []
    handle = predictor.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    try:
        with_cam = predictor.predict(xrays[0], cam="gradcam")
        assert calls == [1] and with_cam.heatmap is not None
        calls.clear()
        batch = predictor.predict_batch(xrays, cam="gradcam")
        assert calls == [3] and all(p.heatmap is not None for p in batch)
        calls.clear()
        plain = predictor.predict_batch(xrays)
        assert calls == [3] and all(p.heatmap is None for p in plain)
    finally:
        handle.remove()
    assert not predictor.model._forward_hooks
    for single, batched in zip([predictor.predict(x, cam=None) for x in xrays], plain, strict=True):
        assert single.label == batched.label
        assert all(math.isclose(single.probs[c], batched.probs[c], abs_tol=1e-5) for c in predictor.classes)


def test_explaining_a_chosen_class(predictor: Predictor, xrays: list[Xray]) -> None:
    by_name = predictor.predict(xrays[0], cam="gradcam++", cam_class="pneumonia")
    by_index = predictor.predict(xrays[0], cam="gradcam++", cam_class=2)
    assert by_name.cam_class == by_index.cam_class == "pneumonia" and by_name.cam_method == "gradcam++"
    np.testing.assert_allclose(by_name.heatmap, by_index.heatmap, atol=1e-6)
    other = predictor.predict(xrays[0], cam="gradcam++", cam_class="covid")
    assert np.abs(other.heatmap - by_name.heatmap).max() > 0.05
    with pytest.raises(ValueError, match="unknown class"):
        predictor.predict(xrays[0], cam_class="influenza")
    with pytest.raises(ValueError, match="unknown CAM method"):
        predictor.predict(xrays[0], cam="magic")


def test_array_inputs(predictor: Predictor, xrays: list[Xray]) -> None:
    pixels = xrays[2].pixels
    as_uint8 = np.rint(pixels * 255).astype(np.uint8)
    from_uint8 = predictor.predict(as_uint8, cam=None, name="u8")
    from_float = predictor.predict(as_uint8.astype(np.float32) / 255, cam=None)
    assert from_uint8.name == "u8" and from_float.name == ""
    assert all(math.isclose(from_uint8.probs[c], from_float.probs[c], abs_tol=1e-6) for c in predictor.classes)
    for bad in (np.zeros((32, 32, 3), np.float32), pixels * 255.0, np.full((8, 8), np.nan)):
        with pytest.raises(ValueError):
            predictor.predict(bad, cam=None)
    assert predictor.predict_batch([]) == []


def _bad_files(folder: Path, shared_data: Path) -> list[Path]:
    folder.mkdir(parents=True)
    png = next(p for p in sorted(shared_data.glob("*/*.png")))
    truncated, pdf, empty = folder / "truncated.png", folder / "report.png", folder / "empty.png"
    truncated.write_bytes(png.read_bytes()[:2000])
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    empty.write_bytes(b"")
    (folder / "notes.txt").write_text("not an image and not searched for")
    return [truncated, pdf, empty]


def test_cli_predicts_good_files_and_reports_bad_ones(tiny_run: Path, shared_data: Path, shared_dicom_dir: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_files(tmp_path / "mixed", shared_data)
    meta = pd.read_csv(shared_data / "metadata.csv").sort_values("bytes")
    good = [shared_data / p for p in meta.groupby("label").head(1)["path"]]
    dicoms = sorted(shared_dicom_dir.glob("*.dcm"))
    out = tmp_path / "out"
    status = main(["--checkpoint", str(tiny_run / "best.pt"), *map(str, good), str(tmp_path / "mixed"),
                   str(shared_dicom_dir), "--out", str(out), "--batch-size", "2", "--backend", "torch"])
    captured = capsys.readouterr()
    assert status == 1
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "predicted", "decision", "gate", "gate_reason", "prob_covid", "prob_normal",
                                   "prob_pneumonia", "cam_class", "overlay", "note", "error"]
    assert len(table) == len(good) + len(bad) + len(dicoms)
    failed = table[table["error"] != ""]
    assert sorted(failed["path"]) == sorted(map(str, bad))
    assert "truncated" in failed.set_index("path").loc[str(bad[0]), "error"]
    assert "PDF" in failed.set_index("path").loc[str(bad[1]), "error"]
    assert "empty" in failed.set_index("path").loc[str(bad[2]), "error"]
    ok = table[table["error"] == ""]
    assert sorted(ok["path"]) == sorted(map(str, good + dicoms))
    assert set(ok["gate"]) == {"assessed"} and set(ok["gate_reason"]) == {""}  # file checks only: no fitted gate
    probs = ok[["prob_covid", "prob_normal", "prob_pneumonia"]].astype(float)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) and set(ok["predicted"]) <= {"covid", "normal", "pneumonia"}
    assert all(re.fullmatch(r"COVID: (yes|no; most likely (normal|pneumonia))(; caution: .+)?", d)
               for d in ok["decision"]), ok["decision"]  # no stored threshold: the most likely class decides
    for row in ok.itertuples():
        size = Image.open(out / row.overlay).size
        if row.path.endswith(".dcm"):
            assert size == (1024, 1024)
        else:
            height, width = load_xray(row.path).pixels.shape
            assert max(size) == min(1024, max(height, width))
    assert len(captured.out.strip().splitlines()) == len(ok)
    assert all(f"{p}: error: " in captured.err for p in bad) and "Traceback" not in captured.err


def test_cli_without_cam_and_usage_errors(tiny_run: Path, shared_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    image = str(next(iter(sorted(shared_data.glob("normal/*")))))
    ckpt = str(tiny_run / "best.pt")
    assert main(["--checkpoint", ckpt, image, "--cam", "none", "--out", str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "plain").glob("*.png"))
    assert len(pd.read_csv(tmp_path / "plain" / "predictions.csv")) == 1
    capsys.readouterr()
    (tmp_path / "empty-folder").mkdir()
    for argv in (["--checkpoint", str(tmp_path / "missing.pt"), image],
                 ["--checkpoint", ckpt, image, "--cam-class", "influenza"],
                 ["--checkpoint", ckpt, image, "--cam-layer", "backbone.layer9"],
                 ["--checkpoint", ckpt, str(tmp_path / "empty-folder")]):
        status = main([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert status == 2, argv
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    assert main(["--checkpoint", ckpt, image, "--cam", "magic"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_prediction_input_matches_what_training_and_evaluation_see(shared_data: Path) -> None:
    from covidxr.data.cache import decode_square
    from covidxr.images.reader import load_xray
    from covidxr.preprocessing.transforms import cache_size, eval_transform

    path = next((shared_data / "normal").iterdir())
    cached = torch.from_numpy(decode_square(path, cache_size(64))).float().div(255)[None]  # the training cache
    torch.testing.assert_close(PLAIN.network_input(load_xray(path).pixels, 64)[0], eval_transform(64)(cached),
                               atol=0, rtol=0)
