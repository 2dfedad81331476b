"""The clinician app through Streamlit's AppTest: real checkpoint, real X-rays, real DICOMs, the real uploader.

Streamlit 1.67's AppTest drives ``st.file_uploader`` (``set_value``), so the files go through the same code path
as browser uploads. The checkpoint and the audit log are passed through the environment (AppTest has no argv).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from streamlit.testing.v1 import AppTest

from covidxr.dicom import DICOM_HEADER_FIELDS
from covidxr.inference.prediction_log import read_records
from covidxr.io import load_xray

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app" / "streamlit_app.py")
sys.path.insert(0, str(REPO / "app"))

from app_settings import load_settings  # noqa: E402


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean app environment: no checkpoint, an empty runs folder, an audit log in tmp; returns the log path."""
    monkeypatch.delenv("COVIDXR_CHECKPOINT", raising=False)
    monkeypatch.setenv("COVIDXR_RUNS", str(tmp_path / "runs"))
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("COVIDXR_AUDIT_LOG", str(audit))
    return audit


@pytest.fixture
def with_model(app_env: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app environment with the tiny trained run as checkpoint; returns the audit log path."""
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(tiny_run / "best.pt"))
    return app_env


def run_app() -> AppTest:
    """Start the app script once."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, files: list[tuple[str, bytes]]) -> AppTest:
    """Upload files through the page's uploader and rerun."""
    at.file_uploader[0].set_value([(name, data, "application/octet-stream") for name, data in files]).run()
    assert not at.exception, at.exception
    return at


def walk(node: object) -> Iterator[object]:
    """Every element of the rendered tree."""
    yield node
    for child in getattr(node, "children", {}).values():
        yield from walk(child)


def proto_strings(message: object) -> Iterator[str]:
    """Every string field of a protobuf message, recursively (bytes fields such as Arrow tables are skipped)."""
    for _descriptor, value in message.ListFields():  # type: ignore[attr-defined]
        scalar = isinstance(value, (str, bytes)) or hasattr(value, "ListFields")
        repeated = not scalar and hasattr(value, "__len__")
        for item in value if repeated else [value]:
            if isinstance(item, str):
                yield item
            elif hasattr(item, "ListFields"):
                yield from proto_strings(item)


def rendered_text(at: AppTest) -> str:
    """All that the page rendered, as text: every string of every element, plus table and dataframe contents."""
    parts = []
    for node in walk(at._tree):
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.extend(proto_strings(proto))
        if getattr(node, "type", "") in ("table", "dataframe"):
            parts.append(node.value.to_string())
    return "\n".join(parts)


def real_image(data: Path, label: str = "pneumonia") -> Path:
    """A real chest X-ray of the shared data."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    return data / meta[meta["label"] == label]["path"].iloc[0]


def test_settings_ignore_foreign_argv() -> None:
    """Under pytest the argv is not the app's; under streamlit run the arguments after -- are read."""
    env = {"COVIDXR_CHECKPOINT": "/env/best.pt"}
    assert load_settings(["pytest", "--checkpoint", "/x.pt"], env).checkpoint == Path("/env/best.pt")
    settings = load_settings(["app/streamlit_app.py", "--checkpoint", "/cli.pt", "--audit-log", "/a.jsonl"], env)
    assert settings.checkpoint == Path("/cli.pt") and settings.audit_log == Path("/a.jsonl")
    assert settings.runs == Path("runs")


def test_no_checkpoint_explains_how_to_train(app_env: Path) -> None:
    at = run_app()
    text = rendered_text(at)
    assert "No model loaded yet" in text
    assert "python -m covidxr.train" in text and "python -m covidxr.evaluate" in text
    assert "not a medical device" in text


def test_broken_checkpoint_is_a_message(app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(bad))
    at = run_app()
    assert any("could not be loaded" in e.value for e in at.error)
    assert "python -m covidxr.train" in rendered_text(at)


def test_runs_folder_checkpoint_offered(app_env: Path, tiny_run: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "tiny"
    runs.mkdir(parents=True)
    shutil.copy(tiny_run / "best.pt", runs / "best.pt")
    at = run_app()
    assert at.sidebar.selectbox[0].value == (runs / "best.pt").resolve()
    assert "Analyse images" in rendered_text(at)


def test_image_and_bad_file(with_model: Path, shared_data: Path) -> None:
    """A real X-ray gets a prediction with probabilities and a heat map; a corrupt file gets one error line."""
    good = real_image(shared_data)
    at = run_app()
    truncated = good.read_bytes()[:2000]
    upload(at, [(good.name, good.read_bytes()), ("broken.png", truncated), ("notes.txt", b"hello")])
    headline = [m.value for m in at.markdown if m.value.startswith("### Model output")]
    assert len(headline) == 1
    captions = [c.value for c in at.caption]
    assert any(c.startswith("Probabilities: ") for c in captions)
    text = rendered_text(at)
    assert "Grad-CAM heat map for '" in text, text  # the overlay image's caption
    errors = [e.value for e in at.error]
    assert any(e.startswith("broken.png: ") for e in errors), errors
    assert any(e.startswith("notes.txt: ") for e in errors), errors
    assert all("Traceback" not in e for e in errors)
    records = read_records(with_model)
    assert len(records) == 1
    record = records[0]
    xray = load_xray(good)
    assert set(record["probabilities"]) == {"covid", "normal", "pneumonia"}
    assert record["image_shape"] == list(xray.pixels.shape) and record["cam_method"] == "gradcam"
    assert record["image_sha256"] == hashlib.sha256(np.ascontiguousarray(xray.pixels).tobytes()).hexdigest()
    assert good.name not in with_model.read_text()  # no file names in the audit log

    # changing the opacity re-draws without predicting again; changing the explained class predicts (and audits)
    at.slider(key=f"{at.file_uploader[0].value[0].file_id}:alpha").set_value(0.8).run()
    assert len(read_records(with_model)) == 1
    methods = at.selectbox(key=f"{at.file_uploader[0].value[0].file_id}:cam").options
    assert "Grad-CAM" in methods and "Off" in methods
    assert "Score-CAM (slow)" not in methods  # minutes per image on a CPU, blocking the shared model
    at.selectbox(key=f"{at.file_uploader[0].value[0].file_id}:class").set_value("covid").run()
    assert not at.exception
    records = read_records(with_model)
    assert len(records) == 2 and records[1]["cam_class"] == "covid"
    assert "heat map for 'covid'" in rendered_text(at)


def test_dicom_header_without_patient_data(with_model: Path, shared_dicom_dir: Path) -> None:
    """DICOMs show the technical header fields; the patient's name and ID appear nowhere, nor in the audit log."""
    paths = sorted(shared_dicom_dir.glob("*.dcm"))
    assert paths
    at = run_app()
    upload(at, [(p.name, p.read_bytes()) for p in paths])
    assert not at.error, [e.value for e in at.error]
    tables = [t.value for t in at.table]
    assert len(tables) == len(paths)
    for table in tables:
        assert set(table.index) <= set(DICOM_HEADER_FIELDS)
        assert table.loc["Modality", "value"] == "CR" and table.loc["ViewPosition", "value"] == "PA"
    secrets = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        secrets |= {str(ds.PatientName), str(ds.PatientID)}
    secrets.discard("")
    assert secrets
    text, log = rendered_text(at), with_model.read_text()
    for value in secrets:
        assert value not in text
        assert value not in log
    assert len(read_records(with_model)) == len(paths)


def test_unsuitable_input_is_not_assessed(with_model: Path) -> None:
    """A small colour picture is not assessed (colour, size); its output is shown only when asked for."""
    import io

    from PIL import Image

    rgb = np.zeros((120, 160, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[:, :80, 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    at = upload(run_app(), [("photo.png", buffer.getvalue())])
    refusal = " ".join(e.value for e in at.error)
    assert refusal.startswith("**Not assessed:**") and "colour image" in refusal and "too small" in refusal
    assert not [m for m in at.markdown if m.value.startswith("### Model output")]
    assert any("only the file checks ran" in c.value for c in at.caption)
    record = read_records(with_model)[0]
    assert any(w.startswith("Not assessed: a colour image") for w in record["warnings"])
    at.toggle[0].set_value(True).run()
    assert len([m for m in at.markdown if m.value.startswith("### Model output")]) == 1


def test_model_view_not_evaluated_then_evaluated(app_env: Path, tiny_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an evaluation the page says how to run it; after ``covidxr.evaluate`` it shows the saved numbers."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "audit*"))
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(run / "best.pt"))
    at = run_app()
    assert any("python -m covidxr.evaluate --checkpoint" in i.value for i in at.info)

    from covidxr.evaluation.__main__ import main as evaluate

    assert evaluate(["--checkpoint", str(run / "best.pt"), "--bootstrap", "50", "--workers", "0"]) == 0
    at = run_app()
    text = rendered_text(at)
    assert "Sensitivity (95% CI)" in text and "Specificity (95% CI)" in text and "NPV" in text
    per_class = next(d.value for d in at.dataframe if "Sensitivity (95% CI)" in d.value.columns)
    assert list(per_class["Class"]) == ["covid", "normal", "pneumonia"]
    plots = [img for img in walk(at._tree) if getattr(img, "type", "") == "image"]
    assert {"Confusion matrix (counts)", "ROC curves, one class against the rest"} <= {
        i.caption for p in plots for i in p.proto.imgs}
    assert "Confusion matrix" in text


def test_oversized_empty_and_crashing_files_stay_contained(with_model: Path, shared_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The size cap, an empty file and an unexpected internal error each give one line; the good file still works."""
    import app_results

    good = real_image(shared_data)
    monkeypatch.setattr(app_results, "MAX_FILE_BYTES", 10_000)
    big = b"\x89PNG\r\n\x1a\n" + bytes(20_000)
    at = run_app()
    upload(at, [("big.png", big), ("empty.png", b"")])
    errors = [e.value for e in at.error]
    assert any(e.startswith("big.png: the file is") and "over the limit" in e for e in errors), errors
    assert any(e.startswith("empty.png: ") and "empty" in e for e in errors), errors
    monkeypatch.setattr(app_results, "MAX_FILE_BYTES", 2**28)

    calls = {"n": 0}
    real_warnings = app_results.input_warnings

    def crash_once(xray: object) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return real_warnings(xray)

    monkeypatch.setattr(app_results, "input_warnings", crash_once)
    at = run_app()
    upload(at, [("first.png", good.read_bytes()), ("second.png", good.read_bytes())])
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("first.png: could not be processed because of an internal error")
    assert "secret internal detail" not in rendered_text(at)
    assert len([m for m in at.markdown if m.value.startswith("### Model output")]) == 1


def test_files_without_extension_option(with_model: Path) -> None:
    """The uploader filters by image types, or accepts any name when the sidebar option is ticked."""
    at = run_app()
    assert ".dcm" in at.file_uploader[0].allowed_type and ".dicom" in at.file_uploader[0].allowed_type
    at.sidebar.checkbox[0].check().run()
    assert not at.exception
    assert at.file_uploader[0].allowed_type == []


def _append_many(path: str, writer: int, count: int) -> None:
    """Append ``count`` large records from one process (helper of the concurrency test)."""
    from covidxr.inference.prediction_log import PredictionLog

    log = PredictionLog(Path(path))
    for i in range(count):
        log.append({"writer": writer, "i": i, "padding": "x" * 6000})


def test_audit_log_concurrent_appends_and_privacy(tmp_path: Path) -> None:
    """Lines of concurrent writers never interleave; records keep only the allowed header fields."""
    import multiprocessing

    from covidxr.inference.prediction_log import PredictionLog, pixel_sha256, prediction_record

    path = tmp_path / "sub" / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w, 150)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    records = read_records(path)
    assert len(records) == 600
    assert {(r["writer"], r["i"]) for r in records} == {(w, i) for w in range(4) for i in range(150)}
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    pixels = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    record = prediction_record(
        session_id="s", image_sha256=pixel_sha256(pixels), image_shape=pixels.shape, image_format="DICOM",
        header={"Modality": "CR", "PatientName": "Doe^Jane", "PatientID": "12345"}, arch="resnet18",
        checkpoint_sha256="c" * 64, classes=["a", "b"], preprocess={"img_size": 64}, temperature=float("nan"),
        probabilities={"a": 0.25, "b": 0.75}, label="b", confidence=0.75, cam_method="gradcam", cam_class="b")
    PredictionLog(path).append(record)
    text = path.read_text()
    assert "Doe^Jane" not in text and "12345" not in text
    last = read_records(path)[-1]
    assert last["dicom_header"] == {"Modality": "CR"} and last["model"]["temperature"] is None
    assert last["image_sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()
