"""The Comprehensive SR of one prediction: the gate's verdict, the model's output, the model and the explanation.

Content tree (every item CONTAINS under the root container "Diagnostic imaging report", LOINC 18748-4)::

    Comment              "Research use only, not for diagnosis. ..."
    Input gate verdict   "assessed" | "not assessed"
    Input gate reason    why it was refused (refused images only)
    Model output         the predicted class                       (assessed images only)
    Probability: CLASS   one NUM per class, in %                   (assessed images only)
    Algorithm Name / Algorithm Version / Checkpoint SHA-256
    Heat map method / Heat map share inside the lungs (%)          (when computed)
    Source Image         IMAGE reference to the analysed DICOM image (DICOM inputs)
    Illustration of Finding  IMAGE reference to the Secondary Capture (when written)

Codes without a standard one use the private scheme :data:`SCHEME` (declared in the Coding Scheme Identification
Sequence). A refused image's SR holds no class and no probability, as the app shows none.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99COVIDXR"
"""The private coding scheme designator of the concepts DICOM has no code for."""

RESEARCH_ONLY = "Research use only, not for diagnosis."

REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
GATE_VERDICT = Code("gate-verdict", SCHEME, "Input gate verdict")
GATE_REASON = Code("gate-reason", SCHEME, "Input gate reason")
MODEL_OUTPUT = Code("model-output", SCHEME, "Model output")
CHECKPOINT = Code("ckpt-sha256", SCHEME, "Checkpoint SHA-256")
CAM_METHOD = Code("cam-method", SCHEME, "Heat map method")
SITE = Code("site-profile", SCHEME, "Site adaptation")
LUNG_SHARE = Code("cam-lung-share", SCHEME, "Heat map share inside the lungs")
PERCENT = Code("%", "UCUM", "percent")


@dataclass(frozen=True)
class ReportFacts:
    """What the SR says about one image.

    Attributes:
        assessable: the input gate's verdict.
        gate_reason: why the gate refused the image ("" when assessed).
        label: the predicted class (ignored for a refused image).
        probs: class -> probability in ``[0, 1]`` (ignored for a refused image).
        arch: the model's architecture.
        version: the covidxr version that made the report.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        cam_method: the heat map's method, or None.
        lung_share: share of the heat map inside the lungs in ``[0, 1]``, or None.
        source_note: a sentence on where the image came from (for an input that was not DICOM), or "".
        site: which site profile produced the answer ("adapted to NAME from N films on DATE; profile SHA-256 ..."),
            or "" for the unadapted model.
    """

    assessable: bool
    gate_reason: str
    label: str
    probs: dict[str, float]
    arch: str
    version: str
    checkpoint_sha256: str
    cam_method: str | None = None
    lung_share: float | None = None
    source_note: str = ""
    site: str = ""


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")


def _percent(name: Code, fraction: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=round(100.0 * fraction, 4), unit=PERCENT,
                                relationship_type="CONTAINS")


def _image(name: Code, dataset: Dataset) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(name=name, referenced_sop_class_uid=dataset.SOPClassUID,
                                  referenced_sop_instance_uid=dataset.SOPInstanceUID, relationship_type="CONTAINS")


def content_items(facts: ReportFacts, source: Dataset | None, capture: Dataset | None) -> list[Dataset]:
    """The root container's children, in the order of the module docstring."""
    comment = RESEARCH_ONLY + " Made by software; not verified by a person."
    items: list[Dataset] = [_text(codes.DCM.Comment, comment + (f" {facts.source_note}" if facts.source_note else "")),
                            _text(GATE_VERDICT, "assessed" if facts.assessable else "not assessed")]
    if facts.assessable:
        items.append(_text(MODEL_OUTPUT, facts.label))
        items += [_percent(Code(f"prob-{i}", SCHEME, f"Probability: {cls}"), p)
                  for i, (cls, p) in enumerate(facts.probs.items())]
    else:
        items.append(_text(GATE_REASON, facts.gate_reason or "not given"))
    items += [_text(codes.DCM.AlgorithmName, f"covidxr {facts.arch}"),
              _text(codes.DCM.AlgorithmVersion, facts.version),
              _text(CHECKPOINT, facts.checkpoint_sha256)]
    if facts.site:
        items.append(_text(SITE, facts.site))
    if facts.cam_method:
        items.append(_text(CAM_METHOD, facts.cam_method))
    if facts.lung_share is not None:
        items.append(_percent(LUNG_SHARE, facts.lung_share))
    if source is not None:
        items.append(_image(codes.DCM.SourceImage, source))
    if capture is not None:
        items.append(_image(codes.DCM.IllustrationOfFinding, capture))
    return items


def structured_report(facts: ReportFacts, evidence: Sequence[Dataset], *,
                      source: Dataset | None, capture: Dataset | None, series_description: str,
                      manufacturer: str) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of one image, in the first evidence's study, in a new series, VerificationFlag UNVERIFIED.

    Args:
        facts: what to say.
        evidence: the instances the report rests on; the first gives the patient and study (its Patient and Study
            modules are copied).
        source: the analysed DICOM image, referenced in the content (None for a non-DICOM input).
        capture: the Secondary Capture written with it, referenced in the content (None when none was written).
        series_description: the new series' description.
        manufacturer: the Manufacturer of the report's equipment.

    Returns:
        The SR dataset.
    """
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(content_items(facts, source, capture))
    with warnings.catch_warnings():  # highdicom's doubts about the source's own patient name; it is copied as is
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.ComprehensiveSR(
            evidence=list(evidence), content=root, series_instance_uid=hd.UID(), series_number=901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer, is_complete=True,
            is_final=False, is_verified=False, series_description=series_description,
            software_versions=facts.version,
            coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name="covidxr concepts")])
