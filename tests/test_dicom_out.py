"""DICOM results (python -m covidxr.predict --dicom-out, covidxr.inference.dicom_out): the Secondary Capture and the
SR land in the input's study with the patient copied as the source had it, refused and non-DICOM inputs are handled,
the SR is a TID 1500 measurement report in standard codes, dciodvfy finds no error and no unknown coding scheme in
what is written, and dcmtk's dsr2html renders the decision and the algorithm's name."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covidxr.images.reader import load_xray
from covidxr.inference.__main__ import main
from covidxr.inference.decision import decide_prediction
from covidxr.inference.dicom_out import dicom_zip
from covidxr.inference.predictor import Predictor
from covidxr.model.checkpoint import save_checkpoint
from covidxr.networks.architectures import build_model, preprocess_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P-0042", "PatientBirthDate": "19700101", "PatientSex": "F",
           "PatientComments": "synthetic test patient"}
# What highdicom reads or copies of the Patient module (root level) in these tests.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientComments",
                    "OtherPatientIDsSequence", "PatientAge", "IssuerOfPatientID", "EthnicGroup", "PatientBirthTime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained resnet18 at 32 px, 3 classes: outputs are meaningless, their DICOM form is what is tested."""
    model = build_model("resnet18", 3, "none")
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"arch": model.arch, "classes": ["covid", "normal", "pneumonia"],
                           "preprocess": preprocess_for(model, 32).to_dict(), "model": model.state_dict()})
    return path


def write_dicom(path: Path, *, view: str = "PA", patient: dict[str, str] | None = None, age: str | None = None,
                study_uid: str | None = None) -> Dataset:
    """A small DX chest DICOM (a smooth 256 x 256 picture) with the given patient attributes only; returns it."""
    yy, xx = np.mgrid[0:256, 0:256]
    pixels = (128 + 100 * np.sin(xx / 20.0) * np.cos(yy / 30.0)).astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", view, "CHEST"
    for keyword, value in (patient or {}).items():
        setattr(ds, keyword, value)
    if age is not None:
        with warnings.catch_warnings():  # pydicom warns about a malformed age; some archives hold them
            warnings.simplefilter("ignore")
            ds.PatientAge = age
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def predict(checkpoint: Path, out: Path, *inputs: str) -> int:
    return main(["--checkpoint", str(checkpoint), *inputs, "--dicom-out", "--out", str(out), "--device", "cpu",
                 "--batch-size", "2"])


def written(out: Path) -> dict[str, list[Dataset]]:
    """The DICOM files in ``out`` read back with pydicom, by SOP class (``"sc"``, ``"sr"``)."""
    found: dict[str, list[Dataset]] = {"sc": [], "sr": []}
    for file in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(file)
        found["sc" if ds.SOPClassUID == SC_CLASS else "sr"].append(ds)
    assert all(ds.SOPClassUID in (SC_CLASS, SR_CLASS) for group in found.values() for ds in group)
    return found


def flat(items: Any) -> list[Dataset]:
    """Every content item of an SR content tree, depth first."""
    return [x for item in items for x in (item, *flat(item.get("ContentSequence") or []))]


def meaning(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def sr_items(report: Dataset) -> dict[str, Dataset]:
    """The items of the SR's decision group (tracking identifier "covidxr decision") by concept meaning."""
    groups = [g for g in flat(report.ContentSequence) if meaning(g) == "Measurement Group"]
    decision = next(g for g in groups if any(meaning(i) == "Tracking Identifier" and i.TextValue == "covidxr decision"
                                             for i in g.ContentSequence))
    return {meaning(item): item for item in decision.ContentSequence}


def sr_probabilities(report: Dataset) -> dict[str, float]:
    """Class -> probability in % from the per-class measurement groups."""
    found = {}
    for group in (g for g in flat(report.ContentSequence) if meaning(g) == "Measurement Group"):
        items = {meaning(i): i for i in group.ContentSequence}
        tracking = items["Tracking Identifier"].TextValue
        if tracking.startswith("covidxr probability "):
            found[tracking.removeprefix("covidxr probability ")] = float(
                items["Probability"].MeasuredValueSequence[0].NumericValue)
    return found


def algorithm_parameters(report: Dataset) -> list[str]:
    """The TID 4019 Algorithm Parameters of the decision group (several items share that concept name)."""
    group = next(g for g in flat(report.ContentSequence) if meaning(g) == "Measurement Group")
    return [i.TextValue for i in group.ContentSequence if meaning(i) == "Algorithm Parameters"]


def coding_schemes(report: Dataset) -> set[str]:
    """Every coding scheme designator the SR's content uses (concept names, coded values, units)."""
    schemes = set()
    for item in flat(report.ContentSequence):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            schemes |= {c.CodingSchemeDesignator for c in item.get(key) or []}
        for value in item.get("MeasuredValueSequence") or []:
            schemes |= {c.CodingSchemeDesignator for c in value.MeasurementUnitsCodeSequence}
    return schemes


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors about a file, and its warnings about a coding scheme it does not know."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error") or "Coding Scheme Designator" in line]


def test_a_dicom_input_gets_a_secondary_capture_and_an_sr_in_its_study(checkpoint: Path, tmp_path: Path) -> None:
    source = write_dicom(tmp_path / "in" / "chest.dcm", patient=PATIENT, age="62")  # "62": not a valid AS value
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "in" / "chest.dcm")) == 0
    found = written(tmp_path / "out")
    assert [len(found["sc"]), len(found["sr"])] == [1, 1]
    capture, report = found["sc"][0], found["sr"][0]
    uids = {source.SOPInstanceUID, capture.SOPInstanceUID, report.SOPInstanceUID}
    assert len(uids) == 3
    assert len({source.SeriesInstanceUID, capture.SeriesInstanceUID, report.SeriesInstanceUID}) == 3
    for ds in (capture, report):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert {k: str(ds.get(k)) for k in PATIENT} == PATIENT
        assert "PatientAge" not in ds  # malformed in the source: left out, not mended
    # the Secondary Capture: the captioned overlay the command line also writes as PNG, labelled as such
    assert capture.BurnedInAnnotation == "YES" and "not for diagnosis" in capture.ImageComments
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    png = np.asarray(Image.open(next((tmp_path / "out").glob("*_gradcam.png"))).convert("RGB"))
    pixels = capture.pixel_array
    assert pixels.shape[0] > png.shape[0] and np.array_equal(pixels[: png.shape[0], : png.shape[1]], png)
    caption = pixels[png.shape[0]:]
    assert (caption.min(axis=2) < 80).any() and (caption.min(axis=2) > 240).mean() > 0.5  # dark text on white
    # the SR: a TID 1500 measurement report: the decision in codes and in words, probabilities, algorithm, references
    assert report.VerificationFlag == "UNVERIFIED" and report.CompletionFlag == "COMPLETE"
    assert report.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert coding_schemes(report) <= {"DCM", "SCT", "UCUM", "RFC5646"}  # RFC5646: the language of the content
    items = sr_items(report)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv").iloc[0]
    assert csv["gate"] == "assessed" and items["Conclusion"].TextValue == csv["decision"]
    covid = items["COVID-19"].ConceptCodeSequence[0]
    said = "Yes" if csv["decision"].startswith("COVID: yes") else "No"
    assert (covid.CodingSchemeDesignator, covid.CodeMeaning) == ("SCT", said)
    assert items["Finding"].ConceptCodeSequence[0].CodingSchemeDesignator == "SCT"
    probs = sr_probabilities(report)
    assert probs == pytest.approx({c: 100 * csv[f"prob_{c}"] for c in predictor.classes}, abs=1e-3)
    parameters = algorithm_parameters(report)
    assert f"checkpoint SHA-256 {predictor.checkpoint_sha256}" in parameters and "heat map gradcam" in parameters
    assert items["Algorithm Name"].TextValue == "covidxr resnet18"
    assert "not for diagnosis" in items["Comment"].TextValue
    assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert items["Illustration of Finding"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        capture.SOPInstanceUID
    evidence = {ref.ReferencedSOPInstanceUID for series in report.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, capture.SOPInstanceUID}


def test_a_refused_input_gets_an_sr_saying_so_and_no_secondary_capture(checkpoint: Path, tmp_path: Path) -> None:
    source = write_dicom(tmp_path / "lateral.dcm", view="LL", patient=PATIENT)
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "lateral.dcm")) == 0
    found = written(tmp_path / "out")
    assert [len(found["sc"]), len(found["sr"])] == [0, 1]
    report = found["sr"][0]
    items = sr_items(report)
    assert items["Conclusion"].TextValue.startswith("Not assessed: ") and "lateral" in items["Conclusion"].TextValue
    assert sr_probabilities(report) == {} and "COVID-19" not in items and "Finding" not in items
    assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert report.StudyInstanceUID == source.StudyInstanceUID


def test_a_non_dicom_input_needs_the_study_named(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "film.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(png)
    assert predict(checkpoint, tmp_path / "refused", str(png)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dicom-study-from" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()  # refused before anything is predicted or written

    study = write_dicom(tmp_path / "study.dcm", patient=PATIENT)
    assert predict(checkpoint, tmp_path / "out", str(png), "--dicom-study-from", str(tmp_path / "study.dcm")) == 0
    found = written(tmp_path / "out")
    assert [len(found["sc"]), len(found["sr"])] == [1, 1]
    for ds in (found["sc"][0], found["sr"][0]):
        assert ds.StudyInstanceUID == study.StudyInstanceUID
        assert {k: str(ds.get(k)) for k in PATIENT} == PATIENT
    assert "SourceImageSequence" not in found["sc"][0]  # the analysed picture is no DICOM instance
    items = sr_items(found["sr"][0])
    assert "Source of Measurement" not in items and "not a DICOM file" in items["Comment"].TextValue

    capsys.readouterr()
    (tmp_path / "not_dicom.dcm").write_bytes(b"hello")
    assert predict(checkpoint, tmp_path / "bad", str(png), "--dicom-study-from", str(tmp_path / "not_dicom.dcm")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_dicom.dcm: not a DICOM file" in err


def test_an_empty_patient_module_stays_empty(checkpoint: Path, tmp_path: Path) -> None:
    source = write_dicom(tmp_path / "anonymous.dcm")
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "anonymous.dcm")) == 0
    found = written(tmp_path / "out")
    for ds in (*found["sc"], *found["sr"]):
        present = {k: ds[k].value for k in PATIENT_KEYWORDS if k in ds}
        assert set(present) == {"PatientName", "PatientID", "PatientBirthDate", "PatientSex"}  # Type 2: required
        assert all(value in ("", None) for value in present.values())
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert all(ds.get(k) in ("", None) for k in ("AccessionNumber", "StudyID", "StudyDate",
                                                      "ReferringPhysicianName"))


@pytest.mark.parametrize("kind", ["synthetic", "shared"])
def test_dciodvfy_finds_no_error(kind: str, checkpoint: Path, tmp_path: Path, shared_dicom_dir: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    if kind == "synthetic":
        write_dicom(tmp_path / "a.dcm", patient=PATIENT, age="62")
        write_dicom(tmp_path / "b.dcm", view="LL")
        inputs = [str(tmp_path / "a.dcm"), str(tmp_path / "b.dcm")]
        assert any("Patient's Age" in line for line in dciodvfy_errors(tmp_path / "a.dcm"))  # the check can fail
    else:
        inputs = sorted(map(str, shared_dicom_dir.glob("*.dcm")))
    assert predict(checkpoint, tmp_path / "out", *inputs) == 0
    files = sorted((tmp_path / "out").glob("*.dcm"))
    found = written(tmp_path / "out")
    assert len(found["sr"]) == len(inputs) and len(files) == len(found["sc"]) + len(found["sr"])
    if kind == "shared":
        assert len(found["sc"]) == len(inputs)
        studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in inputs}
        assert {ds.StudyInstanceUID for group in found.values() for ds in group} == studies
    assert {f.name: dciodvfy_errors(f) for f in files} == {f.name: [] for f in files}
    # the check can fail: a private coding scheme in the report is flagged
    report = pydicom.dcmread(next(f for f in files if f.name.endswith("_sr.dcm")))
    flat(report.ContentSequence)[-1].ConceptNameCodeSequence[0].CodingSchemeDesignator = "99COVIDXR"
    report.save_as(tmp_path / "private.dcm")
    assert any("99COVIDXR" in line for line in dciodvfy_errors(tmp_path / "private.dcm"))


def test_dsr2html_renders_the_decision_and_the_algorithm(checkpoint: Path, tmp_path: Path) -> None:
    """dcmtk's SR renderer reads the report: the decision in the page's words and the algorithm's name."""
    import html
    import re

    if shutil.which("dsr2html") is None:
        pytest.fail("dsr2html (Debian package dcmtk) is not installed; .ci/run installs it")
    write_dicom(tmp_path / "chest.dcm", patient=PATIENT)
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "chest.dcm")) == 0
    result = subprocess.run(["dsr2html", str(tmp_path / "out" / "chest_sr.dcm")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", result.stdout)).split())
    decision = pd.read_csv(tmp_path / "out" / "predictions.csv").iloc[0]["decision"]
    assert decision.startswith("COVID: ") and decision in text
    assert "covidxr resnet18" in text and "Plain chest X-ray" in text and "Imaging Measurement Report" in text


def test_the_app_download_holds_the_same_objects(checkpoint: Path, tmp_path: Path) -> None:
    source = write_dicom(tmp_path / "chest.dcm", patient=PATIENT)
    data = (tmp_path / "chest.dcm").read_bytes()
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    prediction = predictor.predict(load_xray(data), cam="gradcam")
    labelled = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(labelled, format="PNG")
    with zipfile.ZipFile(io.BytesIO(dicom_zip(data, prediction, predictor, labelled.getvalue(), "chest"))) as zf:
        assert sorted(zf.namelist()) == ["chest_sc.dcm", "chest_sr.dcm"]
        capture = pydicom.dcmread(io.BytesIO(zf.read("chest_sc.dcm")))
        report = pydicom.dcmread(io.BytesIO(zf.read("chest_sr.dcm")))
    assert capture.StudyInstanceUID == report.StudyInstanceUID == source.StudyInstanceUID
    assert np.array_equal(capture.pixel_array, np.full((40, 30, 3), 200, np.uint8))
    decision = decide_prediction(prediction, predictor.operating_point)
    assert sr_items(report)["Conclusion"].TextValue == decision.text


@pytest.mark.parametrize(("change", "message"), [({"SOPClassUID": "1.2.3.4"}, "not a standard DICOM one"),
                                                 ({"StudyInstanceUID": None}, "lacks StudyInstanceUID")])
def test_a_dicom_that_cannot_be_filed_is_that_file_s_error(change: dict, message: str, checkpoint: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = write_dicom(tmp_path / "odd.dcm", patient=PATIENT)
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    write_dicom(tmp_path / "fine.dcm", patient=PATIENT)
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "odd.dcm"), str(tmp_path / "fine.dcm")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "odd.dcm" in line]
    assert len(err) == 1 and message in err[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == ["fine_sc.dcm", "fine_sr.dcm"]
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False).set_index("path")
    assert message in rows.loc[str(tmp_path / "odd.dcm"), "error"]
