"""The clinician app through Streamlit's AppTest: real checkpoint, real X-rays, real DICOMs, the real uploader.

Streamlit 1.67's AppTest drives ``st.file_uploader`` (``set_value``), so the files go through the same code path
as browser uploads. The checkpoint and the audit log are passed through the environment (AppTest has no argv).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from app_inputs import EXTERNAL_NAME, fake_evaluation, lateral_dicom, ship_threshold, write_evaluation
from streamlit.testing.v1 import AppTest

from app.format import probability
from app.settings import load_settings
from covidxr.images.dicom import DICOM_HEADER_FIELDS
from covidxr.images.reader import load_xray
from covidxr.inference.prediction_log import read_records

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app" / "streamlit_app.py")
NATURAL_FREQUENCIES = ("On 199 films from hospitals it never saw, it found 76 of 99 COVID films and wrongly called 20 "
                       "of 100 other films COVID; 76 of its 96 COVID calls were right.")


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean app environment: no checkpoint, an empty runs folder, an audit log in tmp; returns the log path."""
    monkeypatch.delenv("COVIDXR_CHECKPOINT", raising=False)
    monkeypatch.setenv("COVIDXR_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("COVIDXR_HOME", str(tmp_path / "home"))  # no lung model unless a test installs one
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
    headline = [m.value for m in at.markdown if m.value.startswith("### COVID: ")]
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

    # the opacity re-draws without predicting again; another class or method adds an explanation record only
    key = at.file_uploader[0].value[0].file_id
    at.slider(key=f"{key}:alpha").set_value(0.8).run()
    assert len(read_records(with_model)) == 1
    methods = at.selectbox(key=f"{key}:cam").options
    assert "Grad-CAM" in methods and "Off" in methods
    assert "Score-CAM (slow)" not in methods  # minutes per image on a CPU, blocking the shared model
    at.selectbox(key=f"{key}:class").set_value("covid").run()
    assert not at.exception
    assert "heat map for 'covid'" in rendered_text(at)
    at.selectbox(key=f"{key}:cam").set_value("gradcam++").run()
    at.selectbox(key=f"{key}:class").set_value(None).run()
    at.selectbox(key=f"{key}:cam").set_value("gradcam").run()  # seen before: no record at all
    assert not at.exception
    records = read_records(with_model)
    assert [r["event"] for r in records] == ["prediction", "explanation", "explanation", "explanation"]
    assert [(r["cam_method"], r["cam_class"]) for r in records[1:]] == [
        ("gradcam", "covid"), ("gradcam++", "covid"), ("gradcam++", records[0]["label"])]
    assert {r["image_sha256"] for r in records} == {record["image_sha256"]}
    assert "probabilities" not in records[1] and "dicom_header" not in records[1]


def test_dicom_header_without_patient_data(with_model: Path, shared_dicom_dir: Path) -> None:
    """DICOMs show the technical header fields; the patient's name and ID appear nowhere, nor in the audit log."""
    paths = sorted(shared_dicom_dir.glob("*.dcm"))
    assert paths
    at = run_app()
    upload(at, [(p.name, p.read_bytes()) for p in paths])
    assert not at.error, [e.value for e in at.error]
    tables = [t.value for t in at.table if "value" in t.value.columns]
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


def headlines(at: AppTest) -> list[str]:
    """The per-file headlines in page order: "### COVID: ..." (markdown) or "### Not assessed: ..." (in a red error
    box)."""
    found = [m for m in walk(at._tree) if getattr(m, "type", "") in ("markdown", "error")]
    return [m.value for m in found if isinstance(getattr(m, "value", None), str)
            and m.value.startswith(("### COVID: ", "### Most likely", "### Not assessed"))]


def test_refused_images_show_no_class_and_no_probability(with_model: Path) -> None:
    """A colour picture and a lateral film are not assessed: the reason instead of the headline, no class, no
    probability; the output appears only behind the toggle, with a warning."""
    from PIL import Image

    rgb = np.zeros((120, 160, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[:, :80, 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    at = upload(run_app(), [("photo.png", buffer.getvalue()), ("lateral.dcm", lateral_dicom())])
    shown = headlines(at)
    assert len(shown) == 2 and all(h.startswith("### Not assessed: ") for h in shown), shown
    assert "colour picture" in shown[0] and "too small" not in shown[0]  # one reason: the most likely
    assert "side (lateral) view" in shown[1] and "LL" in shown[1]
    assert any(c.value.startswith("Input gate: ") and "only the file checks ran" in c.value for c in at.caption)
    text = rendered_text(at)
    assert "Probabilities: " not in text and "heat map for" not in text
    assert not re.search(r"COVID probability \S*\d", text)
    assert all(e.icon == ":material/block:" for e in at.error)  # red, with a stop icon, the words say the same
    summary = next(t.value for t in at.table if "Verdict" in t.value.columns)
    assert list(summary["Verdict"]) == ["not assessed", "not assessed"]
    assert list(summary["Decision"]) == ["", ""] and list(summary["COVID probability"]) == ["", ""]
    records = read_records(with_model)
    assert [r["verdict"]["assessable"] for r in records] == [False, False]
    assert any("colour" in w for w in records[0]["warnings"])

    at.toggle(key=f"{at.file_uploader[0].value[1].file_id}:anyway").set_value(True).run()
    assert not at.exception
    text = rendered_text(at)
    assert text.count("Probabilities: ") == 1 and "heat map for" in text
    assert any("Shown on request" in w.value for w in at.warning)
    assert all(h.startswith("### Not assessed: ") for h in headlines(at))  # still no headline
    assert len(read_records(with_model)) == 2


def test_summary_table_lists_failed_files_and_progress_ends(with_model: Path, shared_data: Path) -> None:
    good = real_image(shared_data)
    at = upload(run_app(), [(good.name, good.read_bytes()), ("broken.png", good.read_bytes()[:2000]),
                            ("lateral.dcm", lateral_dicom())])
    summary = next(t.value for t in at.table if "Verdict" in t.value.columns)
    assert list(summary.columns) == ["File", "Verdict", "Decision", "COVID probability", "Reason or error"]
    rows = summary.set_index("File")
    title = next(h for h in headlines(at) if h.startswith("### COVID"))
    assert rows.loc[good.name, "Verdict"] == "assessed" and rows.loc[good.name, "Decision"] == title[4:]
    covid = rows.loc[good.name, "COVID probability"]
    assert covid.endswith("%") and covid != "100%" and f"COVID probability {covid} " in rendered_text(at)
    assert rows.loc["broken.png", "Verdict"] == "failed" and "truncated" in rows.loc["broken.png", "Reason or error"]
    assert rows.loc["lateral.dcm", "Verdict"] == "not assessed"
    assert "lateral" in rows.loc["lateral.dcm", "Reason or error"]
    assert not [p for p in walk(at._tree) if getattr(p, "type", "") == "progress"]  # replaced by the table
    button = next(b for b in walk(at._tree) if getattr(b, "type", "") == "download_button"
                  and "CSV" in getattr(b, "proto", None).label)
    assert "(3 files)" in button.proto.label


def test_results_csv_keeps_failed_and_refused_rows() -> None:
    from app.analysis import FileResult
    from app.assessment import Assessment
    from app.summary import results_csv
    from covidxr.inference.decision import OperatingPoint, decide
    from covidxr.inference.predictor import Prediction

    probs = {"covid": 0.9999, "normal": 0.00005, "pneumonia": 0.00005}
    good = Prediction("a.png", probs, "covid", 0.9999)
    decision = decide(probs, OperatingPoint("covid", 0.38), borderline=True)
    results = [FileResult("a.png", good, Assessment(True, borderline=True), "sha-a", decision=decision),
               FileResult("b.png", good, Assessment(False, ("a lateral view",)), "sha-b"),
               FileResult("c.png", error="the file is truncated")]
    table = pd.read_csv(io.BytesIO(results_csv(results, ["covid", "normal", "pneumonia"])), keep_default_na=False)
    assert list(table["verdict"]) == ["assessed", "not assessed", "failed"]
    assert list(table["decision"]) == ["COVID: yes; caution: unusual film for this model", "", ""]
    assert list(table["covid"]) == ["yes", "", ""] and list(table["covid_probability"]) == ["> 99%", "", ""]
    assert table.loc[0, "cautions"] == "unusual film for this model" and float(table.loc[0, "threshold"]) == 0.38
    assert table.loc[1, "reason"] == "A lateral view" and table.loc[2, "error"] == "the file is truncated"
    assert float(table.loc[0, "p_covid"]) == 0.9999 and table.loc[1, "p_covid"] == ""


@pytest.mark.parametrize(("value", "text"), [(1.0, "> 99%"), (0.9951, "> 99%"), (0.99, "99%"), (0.5, "50%"),
                                             (0.0101, "1%"), (0.0099, "< 1%"), (0.0, "< 1%"), (float("nan"), "–")])
def test_probabilities_never_read_certain(value: float, text: str) -> None:
    assert probability(value) == text
    assert probability(value, 1) not in ("100.0%", "0.0%")


def test_downloaded_overlay_has_colour_bar_and_caption() -> None:
    """The captioned PNG keeps the overlay unchanged on top and draws the colour bar and the caption below it."""
    from PIL import Image

    from app.heatmap import overlay_png
    from covidxr.explain.display import captioned, overlay

    rng = np.random.default_rng(0)
    pixels = rng.random((300, 400), dtype=np.float32)
    heat = np.zeros((300, 400), np.float32)
    heat[100:200, 150:250] = 1.0
    lines = ["Model output: covid (> 99%)", "Grad-CAM heat map for 'covid'", "Research use only."]
    picture = overlay(pixels, heat, alpha=0.6)
    assert (picture[:90] == overlay(pixels, None)[:90]).all()  # below the threshold nothing is drawn
    png = Image.open(io.BytesIO(overlay_png(pixels, heat, 0.6, lines)))
    drawn = np.asarray(png.convert("RGB"))
    assert drawn.shape[0] > picture.shape[0] and (drawn[: picture.shape[0], :400] == picture).all()
    assert png.text["Description"] == "\n".join(lines)
    assert (drawn == captioned(picture, lines)).all()
    assert not (drawn == captioned(picture, [*lines[:2], "Something else."])).all()  # the text is in the pixels


def test_model_view_not_evaluated_then_evaluated(app_env: Path, tiny_run: Path, tmp_path: Path, shared_data: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an evaluation the page says how to run it; after ``covidxr.evaluate --external`` it shows the saved
    numbers, the external ones first."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "audit*"))
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(run / "best.pt"))
    at = run_app()
    assert any("python -m covidxr.evaluate --checkpoint" in i.value for i in at.info)

    from covidxr.evaluation.__main__ import main as evaluate

    assert evaluate(["--checkpoint", str(run / "best.pt"), "--bootstrap", "50", "--workers", "0",
                     "--external", str(shared_data.parent / "external")]) == 0
    at = run_app()
    text = rendered_text(at)
    order = positions(text, "External validation: COVID-CXNet + chest X-ray teaching films", "199 images",
                      "Internal test (same sources as training)")
    assert order == sorted(order) and "No external validation" not in text
    assert "Sensitivity (95% CI)" in text and "Specificity (95% CI)" in text and "NPV" in text
    per_class = next(d.value for d in at.table if "Test images" in d.value.columns)  # the internal one
    assert list(per_class["Class"]) == ["covid", "normal", "pneumonia"]
    plots = [img for img in walk(at._tree) if getattr(img, "type", "") == "image"]
    assert {"Confusion matrix (counts)", "ROC curves, one class against the rest"} <= {
        i.caption for p in plots for i in p.proto.imgs}
    assert "Confusion matrix" in text
    assert re.search(r"On \d+ films from hospitals it never saw, it found \d+ of \d+ COVID films", text)


@pytest.fixture
def own_run(app_env: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny run (no evaluation folder) served by the app."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "audit*"))
    monkeypatch.setenv("COVIDXR_CHECKPOINT", str(run / "best.pt"))
    return run


def evaluated_sha(run: Path) -> str:
    """The checkpoint digest a saved evaluation must record to be shown for this run."""
    from covidxr.files import file_digest
    from covidxr.model.calibration_file import read_calibration

    summary = (read_calibration(run / "best.pt", file_digest(run / "best.pt")) or {}).get("evaluation") or {}
    return summary.get("checkpoint_sha256") or file_digest(run / "best.pt")


def positions(text: str, *needles: str) -> list[int]:
    """Where each needle first appears in ``text`` (all must appear)."""
    found = [text.find(n) for n in needles]
    assert all(i >= 0 for i in found), [n for n, i in zip(needles, found, strict=True) if i < 0]
    return found


def test_model_tab_leads_with_external_results_and_baselines(own_run: Path, shared_data: Path) -> None:
    classes = ["covid", "normal", "pneumonia"]
    sha = evaluated_sha(own_run)
    ship_threshold(own_run, sha)
    write_evaluation(own_run, fake_evaluation(classes, sha, external=True))
    at = run_app()
    text = rendered_text(at)
    order = positions(text, "This model in short", NATURAL_FREQUENCIES, "External validation: COVID-CXNet",
                      "Each source left out of training in turn", "Internal test (same sources as training)",
                      "Training", "Validation macro ROC-AUC")
    assert order == sorted(order)
    assert "No external validation" not in text
    assert "Kermany paediatric (Guangzhou)" in text and "ieee8023 COVID-19 image collection" in text
    for repository in ("lecuong1502", "hida6", "armiro", str(own_run)):
        assert repository not in text, repository
    comparison = [t.value for t in at.table if "Classifier" in t.value.columns]
    assert len(comparison) == 2  # external and internal, each with its baselines
    assert comparison[0]["Classifier"].str.startswith("Source only").any()
    assert comparison[0]["Classifier"].str.startswith("Chance").any()
    assert "71%" in comparison[0].to_string() and "52%" in comparison[0].to_string()
    external = next(t.value for t in at.table if "Images" in t.value.columns and "ROC-AUC" in t.value.columns)
    assert list(external["Class"]) == ["covid", "normal"] and "43% (33%–48%)" in external.to_string()
    crossval = next(t.value for t in at.table if "Source left out of training" in t.value.columns)
    assert list(crossval["Source left out of training"]) == ["Kermany paediatric (Guangzhou)",
                                                 "ieee8023 COVID-19 image collection"]
    assert list(crossval["Recall covid"]) == ["50% (40%–55%)"] * 2
    assert list(crossval["Source alone, on the sources learned from"]) == ["90%"] * 2
    assert "only the network's last layer retrained each time, efficientnet_lite0" in text and "probe, " not in text
    assert "fitted on the run's validation split" in text and "same hospitals" in text
    assert not [n for n in walk(at._tree) if getattr(n, "type", "") == "json"]  # no raw JSON
    assert any("evaluation report" in b.proto.label for b in walk(at._tree)
               if getattr(b, "type", "") == "download_button")

    external = next(e for e in at.expander if e.label == "On films from sources it never saw")
    inside = "\n".join(proto for node in walk(external) if getattr(node, "proto", None) is not None
                       for proto in proto_strings(node.proto))
    assert "Never seen in training: COVID-CXNet" in inside and "Internal test" not in inside  # no internal figure
    assert "0.89" not in inside and "84%" not in inside  # the internal test's COVID AUC and sensitivity

    good = real_image(shared_data)
    upload(at, [(good.name, good.read_bytes())])
    assert [m.value for m in at.markdown if m.value.startswith("On 199 films")] == [NATURAL_FREQUENCIES]
    title = next(h for h in headlines(at) if not h.startswith("### Not assessed"))
    assert re.fullmatch(r"### COVID: (yes|no; most likely \w+)(; caution: .+)?", title)
    assert any(m.value.startswith("COVID probability ") and "(yes from 38%)" in m.value for m in at.markdown)


def test_model_tab_says_first_that_there_is_no_external_result(own_run: Path, shared_data: Path) -> None:
    sha = evaluated_sha(own_run)
    ship_threshold(own_run, sha)
    write_evaluation(own_run, fake_evaluation(["covid", "normal", "pneumonia"], sha, external=False))
    at = run_app()
    text = rendered_text(at)
    order = positions(text, "No external validation", "Internal test (same sources as training)",
                      "Validation macro ROC-AUC")
    assert order == sorted(order)
    assert "External validation:" not in text and "Each source left out of training" not in text
    assert "Source only" in text and "It has not been measured on external films." in text
    good = real_image(shared_data)
    upload(at, [(good.name, good.read_bytes())])
    words = next(m.value for m in at.markdown if m.value.startswith("It has **not** been tested"))
    assert "films from hospitals it never saw" in words and "on 61 internal test films" in words
    assert "found 17 of 20 COVID films" in words and "upper bound" in words


def test_crossval_summary_rows_read_too() -> None:
    """Cross-validation given as summary rows (intervals already) reads like crossval.json's folds."""
    from app.eval_tables import crossval_table

    ci = {"estimate": 0.61, "lo": 0.5, "hi": 0.7}
    table = crossval_table([{"held_out": "hida6/covid-chestxray-dataset", "n_images": 9, "n_patients": 8,
                             "balanced_accuracy": ci, "roc_auc_macro": ci, "recall": {"covid": ci}}])
    assert table.iloc[0].to_dict() == {
        "Source left out of training": "ieee8023 COVID-19 image collection", "Images": 9, "Patients": 8,
        "Balanced accuracy": "61% (50%–70%)", "Chance level": "100%", "Macro ROC-AUC": "0.61 (0.50–0.70)",
        "Recall covid": "61% (50%–70%)", "Source alone, on the sources learned from": "–"}


def test_external_evaluations_beside_the_checkpoint_are_shown(own_run: Path) -> None:
    """``covidxr.evaluate --data OTHER`` writes eval-OTHER/metrics.json ("external": true): shown as external
    validation when it was made with this checkpoint, ignored when it belongs to another one."""
    import json

    classes = ["covid", "normal", "pneumonia"]
    sha = evaluated_sha(own_run)
    write_evaluation(own_run, fake_evaluation(classes, sha, external=False))
    outside = fake_evaluation(["covid", "normal"], sha, external=False) | {
        "external": True, "n_images": 199, "data": "/somewhere/secret/external/metadata.csv",
        "by_source": {EXTERNAL_NAME: {"n": 99}, "OpenIST teaching set (pi-null-mezon/OpenIST)": {"n": 100}}}
    for name, digest in (("eval-external", sha), ("eval-other", "f" * 64)):
        (own_run / name).mkdir()
        (own_run / name / "metrics.json").write_text(json.dumps(outside | {"checkpoint_sha256": digest}))
    text = rendered_text(run_app())
    assert text.count("External validation: ") == 1
    assert "External validation: COVID-CXNet + chest X-ray teaching films" in text
    assert "No external validation" not in text and "secret" not in text

    # the same external data also inside metrics.json (evaluate --external): shown once
    write_evaluation(own_run, fake_evaluation(classes, sha, external=True))
    (own_run / "eval-external" / "metrics.json").write_text(json.dumps(
        outside | {"checkpoint_sha256": sha, "by_source": {EXTERNAL_NAME: {"n": 99}}}))
    assert rendered_text(run_app()).count("External validation: COVID-CXNet") == 1


def test_lung_share_only_with_a_lung_model(with_model: Path, shared_data: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a lung model nothing is said about the lungs; with one, the share of the heat map inside them."""
    good = real_image(shared_data)
    at = upload(run_app(), [(good.name, good.read_bytes())])
    assert "inside the lungs" not in rendered_text(at)

    class HalfLungs:  # the left half of every image is "lung" (at the size asked for: the page's display size)
        def mask(self, image: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
            mask = np.zeros(shape or image.shape, dtype=bool)
            mask[:, : mask.shape[1] // 2] = True
            return mask

    import covidxr.lungs
    from covidxr.inference.predictor import Predictor

    monkeypatch.setattr(covidxr.lungs, "load_lung_model", lambda path=None: HalfLungs())
    at = upload(run_app(), [(good.name, good.read_bytes())])
    text = rendered_text(at)
    heat = Predictor.from_checkpoint(os.environ["COVIDXR_CHECKPOINT"], backend="torch").predict(
        load_xray(good)).heatmap
    from covidxr.explain.display import shrink

    heat = shrink(heat, 1024)  # the page measures the share on the heat map at its display size
    expected = covidxr.lungs.cam_share_in_lungs(heat, HalfLungs().mask(heat))
    assert f"**{100 * expected:.0f}%** of the heat map lies inside the lungs" in text


def test_oversized_empty_and_crashing_files_stay_contained(with_model: Path, shared_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The size cap, an empty file and an unexpected internal error each give one line; the good file still works."""
    import app.analysis as app_analysis
    import app.file_view as app_file_view

    good = real_image(shared_data)
    monkeypatch.setattr(app_analysis, "MAX_FILE_BYTES", 10_000)
    big = b"\x89PNG\r\n\x1a\n" + bytes(20_000)
    at = run_app()
    upload(at, [("big.png", big), ("empty.png", b"")])
    errors = [e.value for e in at.error]
    assert any(e.startswith("big.png: the file is") and "over the limit" in e for e in errors), errors
    assert any(e.startswith("empty.png: ") and "empty" in e for e in errors), errors
    monkeypatch.setattr(app_analysis, "MAX_FILE_BYTES", 2**28)

    calls = {"n": 0}
    real_analyse = app_file_view.analyse

    def crash_once(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return real_analyse(*args)

    monkeypatch.setattr(app_file_view, "analyse", crash_once)
    at = run_app()
    upload(at, [("first.png", good.read_bytes()), ("second.png", good.read_bytes())])
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("first.png: could not be processed because of an internal error")
    assert "secret internal detail" not in rendered_text(at)
    assert len([m for m in at.markdown if m.value.startswith("### COVID: ")]) == 1
    summary = next(t.value for t in at.table if "Verdict" in t.value.columns).set_index("File")
    assert summary.loc["first.png", "Verdict"] == "failed"
    assert summary.loc["first.png", "Reason or error"].startswith("internal error (reference ")


def test_files_without_extension_get_a_hint_then_are_read(with_model: Path, shared_dicom_dir: Path) -> None:
    """A DICOM without an extension is not read until the option is ticked; the page says what to do."""
    dicom = sorted(shared_dicom_dir.glob("*.dcm"))[0]
    at = upload(run_app(), [("IM0001", dicom.read_bytes())])
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("IM0001: has no file extension")
    assert "tick 'Accept files without an extension'" in errors[0]
    assert not headlines(at)
    at.checkbox(key="accept_any_name").check().run()
    assert not at.exception and not at.error
    assert len(headlines(at)) == 1 and at.file_uploader[0].value  # the upload is kept


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


def test_dicom_download_is_offered_for_dicom_uploads_only(with_model: Path, shared_dicom_dir: Path,
                                                          shared_data: Path) -> None:
    """Assessed and refused DICOMs get the button (a refused one without its output shown); a PNG does not, nor a
    DICOM without a study to file the results in (it says why)."""
    paths = sorted(shared_dicom_dir.glob("*.dcm"))
    good = real_image(shared_data)
    refused = pydicom.dcmread(io.BytesIO(lateral_dicom()))
    refused.StudyInstanceUID, refused.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    refused.save_as(buffer, enforce_file_format=True)
    at = upload(run_app(), [*((p.name, p.read_bytes()) for p in paths), (good.name, good.read_bytes()),
                            ("refused.dcm", buffer.getvalue()), ("no-study.dcm", lateral_dicom())])
    assert sum(h.startswith("### Not assessed") and "lateral" in h for h in headlines(at)) == 2
    labels = [b.proto.label for b in walk(at._tree) if getattr(b, "type", "") == "download_button"]
    assert labels.count("Download as DICOM") == len(paths) + 1
    assert [c.value for c in at.caption if c.value.startswith("No DICOM download")] == [
        "No DICOM download: no-study.dcm: the DICOM file lacks SeriesInstanceUID, StudyInstanceUID, so results "
        "cannot be filed in its study."]


def test_a_caution_only_where_the_film_calls_for_it(own_run: Path, shared_data: Path) -> None:
    """A film far from the shipped threshold (no gate band, no lung model) carries no caution anywhere; with the
    threshold at its own COVID probability the same film is "close to the threshold", in the title and the table."""
    from covidxr.files import file_digest
    from covidxr.inference.predictor import Predictor

    good = real_image(shared_data)
    sha = file_digest(own_run / "best.pt")
    covid = Predictor.from_checkpoint(own_run / "best.pt", backend="torch").predict(load_xray(good), cam=None).probs
    far = 0.99 if covid["covid"] < 0.5 else 0.01
    for threshold, caution in ((far, False), (covid["covid"] + 0.01, True)):
        ship_threshold(own_run, sha, threshold)
        at = upload(run_app(), [(good.name, good.read_bytes()), ("other.png", good.read_bytes())])
        titles = headlines(at)
        summary = next(t.value for t in at.table if "Verdict" in t.value.columns)
        assert len(titles) == 2 and list(summary["Decision"]) == [t[4:] for t in titles]
        text = rendered_text(at)
        if caution:
            assert all(t.endswith("; caution: COVID probability close to the threshold") for t in titles), titles
            assert "Close to the threshold:" in text
        else:
            assert not any("caution" in t for t in titles) and "Close to the threshold" not in text, titles
            assert "Unusual film" not in text and "outside the lungs" not in text
