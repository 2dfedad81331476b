"""Inputs for the app tests: real films turned into files the page must refuse, and a saved evaluation with the
external-validation and cross-validation entries a newer ``covidxr.evaluate`` writes."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.images.reader import load_xray

NOTCXR = Path(os.environ.get("COVIDXR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
              ).parent / "notcxr"
EXTERNAL_NAME = "COVID-CXNet (armiro/COVID-CXNet)"
HELD_OUT = ("lecuong1502/BTL_Machine_Learning", "hida6/covid-chestxray-dataset")
THRESHOLD = 0.38


def lateral_film(index: int = 0) -> Path:
    """A real lateral chest X-ray of the shared data (``notcxr/lateral``)."""
    meta = pd.read_csv(NOTCXR / "metadata.csv", dtype=str, keep_default_na=False)
    return NOTCXR / meta[meta["kind"] == "lateral"]["path"].iloc[index]


def lateral_dicom(path: Path | None = None) -> bytes:
    """A DX DICOM of a real lateral film whose header says so (ViewPosition LL): refused by the file checks."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.round(load_xray(path or lateral_film()).pixels * 255).astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "LL", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rotated_png(path: Path) -> bytes:
    """A real frontal film turned by 90 degrees (``np.rot90``), as PNG."""
    pixels = np.round(np.rot90(load_xray(path).pixels) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _ci(estimate: float) -> dict[str, float]:
    return {"estimate": estimate, "lo": round(estimate - 0.1, 4), "hi": round(estimate + 0.05, 4)}


def _test_set(classes: list[str], n: int, recall: float) -> dict[str, Any]:
    """Metrics, intervals and baselines of one test set in metrics.json's layout (made-up numbers)."""
    per_class = {c: {"support": n // len(classes), "recall": recall, "specificity": 0.8, "precision": 0.6,
                     "npv": 0.9, "roc_auc": 0.81} for c in classes}
    return {
        "n_images": n, "n_patients": n - 3, "classes": classes,
        "metrics": {"accuracy": 0.66, "balanced_accuracy": 0.68, "f1_macro": 0.6, "roc_auc_macro": 0.84,
                    "ece": 0.0789, "per_class": per_class},
        "ci": {"metrics": {"balanced_accuracy": _ci(0.68), "roc_auc_macro": _ci(0.84)},
               "per_class": {c: {"sensitivity": _ci(recall), "specificity": _ci(0.8)} for c in classes}},
        "baselines": {"source": {"column": "source", "accuracy": 0.7, "balanced_accuracy": 0.712,
                                 "roc_auc_macro": 0.8},
                      "view": {"column": "view", "accuracy": 0.5, "balanced_accuracy": 0.523, "roc_auc_macro": 0.61}},
    }


def fake_evaluation(classes: list[str], checkpoint_sha256: str, external: bool,
                    threshold: float = THRESHOLD) -> dict[str, Any]:
    """A metrics.json with an internal test, baselines, COVID-or-not figures at ``threshold`` and (when asked)
    external and cross-validation results."""
    data = _test_set(classes, 61, 0.7) | {
        "split": "test", "checkpoint_sha256": checkpoint_sha256,
        "calibration": {"temperature": 1.3, "how": "fitted on the run's validation split (60 images)",
                        "ece_before": 0.12, "ece_after": 0.05},
        "by_source": {HELD_OUT[1]: {"n": 30, "accuracy": 0.6, "balanced_accuracy": 0.5, "roc_auc_macro": 0.7}},
        "model_card": {"limitations": ["Made-up limitation for the test."]},
        "covid_vs_rest": covid_block(external, threshold),
    }
    if external:
        outside = [c for c in classes if c != "pneumonia"]
        outside_set = {k: v for k, v in _test_set(outside, 199, 0.4321).items() if k != "classes"}  # not recorded
        data["external"] = [{"name": EXTERNAL_NAME, **outside_set,
                             "calibration": {"ece": 0.2345},
                             "by_source": {EXTERNAL_NAME: {"n": 99, "balanced_accuracy": 0.5}}}]
        data["crossval"] = {"by": "source", "mode": "probe", "arch": "efficientnet_lite0", "folds": [
            {"name": source, **_test_set(classes, 100 + i, 0.5),
             "source_only_on_val": {"column": "source", "balanced_accuracy": 0.9}}
            for i, source in enumerate(HELD_OUT)]}
    return data


def _covid_set(name: str, positives: int, negatives: int, auc: float, sens: float | None, spec: float | None,
               threshold: float) -> dict[str, Any]:
    """One set of metrics.json's ``covid_vs_rest`` (made-up numbers); no threshold for a held-out source."""
    def point(value: float | None) -> dict[str, Any]:
        return {"estimate": None} if value is None else _ci(value)

    return {"name": name, "n_positive": positives, "n_negative": negatives,
            "threshold": None if sens is None else threshold, "auc": _ci(auc), "sensitivity": point(sens),
            "specificity": point(spec)}


def covid_block(external: bool, threshold: float = THRESHOLD) -> dict[str, Any]:
    """metrics.json's ``covid_vs_rest``: the shipped threshold, the internal test (and one of its sources), and with
    ``external`` the held-out sources (AUC only) and the external set: 99 COVID and 100 other films, sensitivity 77%,
    specificity 80%."""
    sets = [_covid_set("internal test", 20, 41, 0.89, 0.84, 0.82, threshold),
            _covid_set(f"internal test: {HELD_OUT[1]}", 10, 8, 0.91, 0.8, 0.75, threshold)]
    if external:
        sets += [_covid_set(f"held out: {HELD_OUT[0]}", 0, 100, 0.70, None, None, threshold),
                 _covid_set(f"held out: {HELD_OUT[1]}", 50, 50, 0.60, None, None, threshold),
                 _covid_set(f"external {EXTERNAL_NAME}", 99, 100, 0.81, 0.77, 0.80, threshold)]
    return {"positive": "covid", "threshold": threshold, "chosen_on": "Youden's J on the held-out sources",
            "sets": sets}


def ship_threshold(run: Path, sha256: str, threshold: float | None = THRESHOLD) -> None:
    """Store the evaluation summary with the COVID threshold beside the run's checkpoint (its calibration sidecar),
    as ``covidxr.evaluate`` does: the page's operating point."""
    from covidxr.model.calibration_file import write_calibration

    block = None if threshold is None else {"positive": "covid", "threshold": threshold,
                                            "chosen_on": "Youden's J on the held-out sources"}
    write_calibration(run / "best.pt", sha256, 1.0, "none (test)", {"checkpoint_sha256": sha256,
                                                                      "covid_vs_rest": block})


def write_evaluation(run: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as the run's eval/metrics.json (and a stand-in report); returns the metrics file."""
    folder = run / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.html").write_text("<html><body>report</body></html>")
    path = folder / "metrics.json"
    path.write_text(json.dumps(data))
    return path


def sr_conclusion(sr: bytes) -> str:
    """The decision words of a DICOM SR written by covidxr (its Conclusion item)."""
    import pydicom

    def items(seq: Any) -> Iterator[Any]:
        for item in seq:
            yield item
            yield from items(item.get("ContentSequence") or [])

    report = pydicom.dcmread(io.BytesIO(sr))
    return next(i.TextValue for i in items(report.ContentSequence)
                if i.ConceptNameCodeSequence[0].CodeMeaning == "Conclusion")
