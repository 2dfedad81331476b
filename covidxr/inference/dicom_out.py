"""Results back to the hospital's archive: a DICOM Secondary Capture of the labelled overlay and a Comprehensive SR.

For one predicted image, :func:`results_as_dicom` builds, with highdicom:

* a **Secondary Capture** (RGB) of the labelled overlay (the heat map with its caption burned in), BurnedInAnnotation
  YES, ImageComments "Research use only, not for diagnosis.", and, for a DICOM input, a Source Image Sequence
  reference to the analysed image. None for an image the input gate refused.
* a **TID 1500 measurement report** in a Comprehensive SR (:mod:`covidxr.inference.dicom_sr`): the decision
  (:mod:`covidxr.inference.decision`) in SNOMED CT codes and in the page's words, or the gate's refusal, the class
  probabilities, the algorithm (TID 4019: model, covidxr version, checkpoint SHA-256, threshold),
  VerificationFlag UNVERIFIED, and references to the source image and the Secondary Capture.

Both belong to the study they are given (the input DICOM itself, or a DICOM file of the study the user names for a
non-DICOM input): same StudyInstanceUID, the Patient and Study modules copied as that file has them (attributes it
lacks stay absent, or empty where the IOD requires them: nothing is invented), a new series each and new UIDs.
For a non-DICOM input there is no source to reference: the SR says so in its comment and lists the named study file
as its evidence (the one instance of the study it was given).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import STR_VR, validate_value

import covidxr
from covidxr.errors import CovidxrError
from covidxr.images.dicom import is_dicom
from covidxr.inference.decision import Decision, decide_prediction, probability
from covidxr.inference.dicom_sr import RESEARCH_ONLY, ReportFacts, structured_report

if TYPE_CHECKING:
    from covidxr.inference.predictor import Prediction, Predictor

log = logging.getLogger("covidxr.predict")

MANUFACTURER = "covidxr"
SC_SERIES = "covidxr heat map overlay (research use only)"
SR_SERIES = "covidxr report (research use only)"
# Type 2 attributes highdicom reads from the reference dataset: the IOD requires them, empty when unknown.
_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def read_header(source: str | os.PathLike | bytes, name: str) -> Dataset:
    """Read a DICOM file's header (no pixel data), the identity that results are filed under.

    Raises:
        CovidxrError: one line, when it is not a DICOM file or lacks the UIDs that place it in a study.
    """
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if not is_dicom(data):
            raise CovidxrError(f"{name}: not a DICOM file")
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=data[128:132] != b"DICM")
    except OSError as exc:
        raise CovidxrError(f"{name}: cannot read the DICOM file ({exc.strerror or exc})") from exc
    except CovidxrError:
        raise
    except Exception as exc:  # any pydicom parse failure
        raise CovidxrError(f"{name}: not a readable DICOM file ({type(exc).__name__})") from exc
    missing = [k for k in _REQUIRED if not str(dataset.get(k, "") or "").strip()]
    if missing:
        raise CovidxrError(f"{name}: the DICOM file lacks {', '.join(missing)}, so results cannot be filed in its "
                           "study")
    if pydicom.uid.UID(str(dataset.SOPClassUID)).type != "SOP Class":
        raise CovidxrError(f"{name}: SOP class {dataset.SOPClassUID} is not a standard DICOM one, so its patient and "
                           "study attributes cannot be told apart")
    return dataset


def _identity(study: Dataset) -> Dataset:
    """The header highdicom copies the patient and study from: ``study`` without the values that are invalid for
    their VR (a malformed Patient's Age such as ``62``: copying it would make the new objects invalid, mending it
    would invent data), and with the Type 2 identity attributes it lacks present and empty (highdicom reads them
    unconditionally; the IOD wants them, empty when unknown)."""
    identity = copy.copy(study)
    for element in list(identity):
        if element.VR not in STR_VR or element.keyword in _REQUIRED or element.value in (None, ""):
            continue
        values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
        try:
            for value in values:
                validate_value(element.VR, str(value), config.RAISE)
        except (ValueError, TypeError):
            log.warning("DICOM header: %s is not a valid %s value; it is left out of the results",
                        element.keyword or element.tag, element.VR)
            del identity[element.tag]
    for keyword in _TYPE2_IDENTITY:
        if keyword not in identity:
            setattr(identity, keyword, "")
    return identity


def caption_lines(prediction: Prediction, predictor: Predictor, decision: Decision | None, *,
                  method: str | None = None, lung_share: float | None = None) -> list[str]:
    """The caption drawn under a downloaded overlay (the app's PNG, the command line's, the Secondary Capture): the
    decision words (or, for a refused image shown on request, the refusal), the number behind them, the heat map,
    the model and date, the intended use.

    Args:
        prediction: the prediction.
        predictor: the predictor that made it.
        decision: its decision (:func:`covidxr.inference.decision.decide`), or None for a refused image.
        method: the heat map method's display name (default: its code name).
        lung_share: the share of the heat map inside the lungs, when measured (default: the prediction's).
    """
    share = prediction.lung_share if lung_share is None else lung_share
    inside = f"; {100 * share:.0f}% of it inside the lungs" if share is not None else ""
    explained = (f"{method or prediction.cam_method} heat map for '{prediction.cam_class}'{inside}"
                 if prediction.cam_method else "no heat map")
    if decision is None:
        reason = prediction.gate.reason if prediction.gate is not None else "not an image the model was made for"
        first = [f"NOT ASSESSED ({reason[:1].upper() + reason[1:]}); output shown on request: {prediction.label} "
                 f"({probability(prediction.confidence)})"]
    else:
        first = [decision.text, decision.figures]
    site = [f"Site: {predictor.site.describe()}"] if predictor.site is not None else []
    return [*first, explained, f"Model: {predictor.arch}, checkpoint {predictor.checkpoint_sha256[:12]}; "
            f"made {datetime.now(UTC):%Y-%m-%d} (UTC)", *site, RESEARCH_ONLY]


def secondary_capture(identity: Dataset, labelled: np.ndarray, source: Dataset | None) -> hd.sc.SCImage:
    """The Secondary Capture of a labelled overlay, in ``identity``'s study, referencing ``source`` when given.

    Args:
        identity: the header the patient and study come from (see :func:`_identity`).
        labelled: ``(h, w, 3)`` uint8 RGB, the overlay with its caption.
        source: the analysed DICOM image's header, or None for a non-DICOM input.
    """
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])] if source is not None else []
    known = len(orientation) == 2 and all(orientation)
    with warnings.catch_warnings():  # highdicom's doubts about the source's own patient name; it is copied as is
        warnings.simplefilter("ignore", UserWarning)
        capture = hd.sc.SCImage.from_ref_dataset(
            identity, pixel_array=np.ascontiguousarray(labelled, dtype=np.uint8), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            patient_orientation=tuple(orientation) if known else ("L", "F"), series_description=SC_SERIES,
            software_versions=covidxr.__version__, transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    if not known:
        # highdicom insists on an orientation; the General Image module lets it be empty (Type 2C) and the source
        # does not say, so it is left empty rather than guessed.
        capture.PatientOrientation = ""
    capture.copy_patient_and_study_information(identity)  # the optional Patient/Study attributes too
    # General Series Laterality is Type 2C; highdicom takes only R or L, and a frontal chest film is neither.
    capture.Laterality = ""
    capture.BurnedInAnnotation = "YES"
    capture.ImageComments = f"{RESEARCH_ONLY} Heat map and caption burned in by covidxr {covidxr.__version__}."
    if source is not None:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        capture.SourceImageSequence = [reference]
        capture.DerivationDescription = "Source image windowed, resized, with a heat map and a caption drawn on it"
    return capture


def results_as_dicom(prediction: Prediction, predictor: Predictor, study: Dataset, *, is_source: bool,
                     labelled: np.ndarray | None,
                     decision: Decision | None = None) -> tuple[hd.sc.SCImage | None, hd.sr.ComprehensiveSR]:
    """The Secondary Capture (None for a refused image or without ``labelled``) and the SR of one prediction.

    Args:
        prediction: the predictor's result for the image.
        predictor: the predictor that made it (model name and checkpoint).
        study: the header of the analysed DICOM image, or of a DICOM file of the study (see ``is_source``).
        is_source: True when ``study`` is the analysed image itself (it is referenced as the source), False when the
            input was not DICOM and ``study`` only gives the patient and study.
        labelled: ``(h, w, 3)`` uint8 RGB labelled overlay, or None.
        decision: the decision the caller showed (the app's, with the lung share it measured); made here from the
            prediction when None.
    """
    identity = _identity(study)
    source = study if is_source else None
    assessable = prediction.gate is None or prediction.gate.assessable
    try:
        capture = secondary_capture(identity, labelled, source) if assessable and labelled is not None else None
        report = _report(prediction, predictor, identity, source, capture, decision)
    except KeyError as exc:  # highdicom looks the source's IOD up by its SOP class to find the patient attributes
        raise CovidxrError(f"DICOM SOP class {study.SOPClassUID} is not a standard one, so its patient and study "
                           "attributes cannot be told apart") from exc
    return capture, report


def _report(prediction: Prediction, predictor: Predictor, identity: Dataset, source: Dataset | None,
            capture: hd.sc.SCImage | None, decision: Decision | None) -> hd.sr.ComprehensiveSR:
    """The SR of :func:`results_as_dicom`."""
    assessable = prediction.gate is None or prediction.gate.assessable
    point = predictor.operating_point
    decision = decision or decide_prediction(prediction, point)
    facts = ReportFacts(
        assessable=assessable, gate_reason="" if prediction.gate is None else prediction.gate.reason,
        decision=decision.text, covid=decision.covid, label=decision.label, probs=dict(prediction.probs),
        rule=point.rule(), threshold=point.threshold, arch=predictor.arch, version=covidxr.__version__,
        checkpoint_sha256=predictor.checkpoint_sha256, cam_method=prediction.cam_method if assessable else None,
        site=site_text(predictor),
        source_note="" if source is not None else "The analysed image was not a DICOM file; the patient and study "
                                                  "are those of a DICOM file the user named.")
    return structured_report(facts, [identity] + ([capture] if capture is not None else []), source=source,
                             capture=capture, series_description=SR_SERIES, manufacturer=MANUFACTURER)


def site_text(predictor: Predictor) -> str:
    """Which site profile produced the answer, for the SR ("" without one)."""
    if predictor.site is None:
        return ""
    return f"{predictor.site.describe()}; profile SHA-256 {predictor.site.sha256}"


def dicom_bytes(dataset: Dataset) -> bytes:
    """A dataset as a DICOM file's bytes (preamble and file meta information)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_zip(data: bytes, prediction: Prediction, predictor: Predictor, labelled_png: bytes | None,
              stem: str, decision: Decision | None = None) -> bytes:
    """For the app: a ZIP of ``STEM_sc.dcm`` (unless refused) and ``STEM_sr.dcm`` for an uploaded DICOM file.

    Args:
        data: the uploaded DICOM file's bytes.
        prediction: its prediction.
        predictor: the predictor.
        labelled_png: the labelled overlay as PNG bytes (the download the app already offers), or None.
        stem: the file name's stem.
        decision: the decision the page showed (None: made from the prediction).
    """
    labelled = None if labelled_png is None else np.asarray(Image.open(io.BytesIO(labelled_png)).convert("RGB"))
    capture, report = results_as_dicom(prediction, predictor, read_header(data, stem), is_source=True,
                                       labelled=labelled, decision=decision)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if capture is not None:
            archive.writestr(f"{stem}_sc.dcm", dicom_bytes(capture))
        archive.writestr(f"{stem}_sr.dcm", dicom_bytes(report))
    return buffer.getvalue()
