"""The SR of one prediction: a TID 1500 Imaging Measurement Report with standard codes, so SR viewers render it.

Content tree (highdicom's ``MeasurementReport`` inside a Comprehensive SR)::

    Imaging Measurement Report (DCM 126000)
      Language, observer device "covidxr", Procedure reported: Plain chest X-ray (SCT 399208008)
      Image Library: the analysed DICOM image (DICOM inputs that give their Imager Pixel Spacing)
      Imaging Measurements (DCM 126010)
        Measurement Group (TID 1501), tracking identifier "covidxr decision"
          Algorithm Name / Algorithm Version / Algorithm Parameters (TID 4019: model, checkpoint, threshold)
          Source image for the group (DICOM inputs)
          Finding (DCM 121071) = the class named (SCT COVID-19 / Pneumonia / Normal)      assessed only
          COVID-19 (SCT 840539006) = Yes / No (SCT 373066001 / 373067005)                 assessed only
          Conclusion (DCM 121077): the decision words every output carries, cautions included, or
                                   "Not assessed: REASON" for a refused image
          Comment (DCM 121106): research use only; how the answer is made
          Illustration of Finding (DCM 125201): the Secondary Capture (when written)
        Measurement Group per class (TID 1501): Finding = the class, Probability in %     assessed only

No private codes: findings are SNOMED CT, the structure DCM, units UCUM. A class without a SNOMED CT code here keeps
its probability group with the class name as text. A refused image's SR holds no class and no probability, as the
app shows none.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

RESEARCH_ONLY = "Research use only, not for diagnosis."

PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
COVID19 = Code("840539006", "SCT", "COVID-19")
FINDINGS = {"covid": COVID19, "covid-19": COVID19, "covid19": COVID19,
            "pneumonia": Code("233604007", "SCT", "Pneumonia"), "normal": codes.SCT.Normal}
PERCENT = Code("%", "UCUM", "percent")
DECISION_TRACKING = "covidxr decision"


def finding_code(label: str) -> Code | None:
    """The SNOMED CT code of a class name, or None for a class without one here."""
    return FINDINGS.get(label.strip().lower())


@dataclass(frozen=True)
class ReportFacts:
    """What the SR says about one image.

    Attributes:
        assessable: the input gate's verdict.
        gate_reason: why the gate refused the image ("" when assessed).
        decision: the decision words (``covidxr.inference.decision.Decision.text``; ignored for a refused image).
        covid: "COVID: yes" (True) or "no" (False); None when the model has no COVID class.
        label: the class named by the decision.
        probs: class -> probability in ``[0, 1]`` (ignored for a refused image).
        rule: the operating point's rule in words.
        threshold: the COVID threshold applied, or None.
        arch: the model's architecture.
        version: the covidxr version that made the report.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        cam_method: the heat map's method, or None.
        source_note: a sentence on where the image came from (for an input that was not DICOM), or "".
        site: which site profile produced the answer ("adapted to NAME from N films on DATE; profile SHA-256 ..."),
            or "" for the unadapted model (an algorithm parameter, TID 4019, and a sentence of the comment).
    """

    assessable: bool
    gate_reason: str
    decision: str
    covid: bool | None
    label: str
    probs: dict[str, float]
    rule: str
    threshold: float | None
    arch: str
    version: str
    checkpoint_sha256: str
    cam_method: str | None = None
    source_note: str = ""
    site: str = ""

    @property
    def conclusion(self) -> str:
        """The decision words, or "Not assessed: REASON"."""
        return self.decision if self.assessable else f"Not assessed: {self.gate_reason or 'reason not given'}"


def _algorithm(facts: ReportFacts) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model, its version and what fixes its answer."""
    parameters = [f"checkpoint SHA-256 {facts.checkpoint_sha256}"]
    if facts.threshold is not None:
        parameters.append(f"COVID threshold {facts.threshold:.4f}")
    if facts.cam_method:
        parameters.append(f"heat map {facts.cam_method}")
    if facts.site:
        parameters.append(f"site profile: {facts.site}")
    return hd.sr.AlgorithmIdentification(name=f"covidxr {facts.arch}", version=facts.version, parameters=parameters)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")


def _probability(fraction: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.DCM.Probability, value=round(100.0 * fraction, 4), unit=PERCENT)


def _group(identifier: str, facts: ReportFacts, source: Dataset | None,
           **kwargs: object) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sources = [hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)] if source else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
        algorithm_id=_algorithm(facts), source_images=sources, **kwargs)  # type: ignore[arg-type]


def _decision_group(facts: ReportFacts, source: Dataset | None,
                    capture: Dataset | None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The group that states the decision (or the refusal) in codes and in the page's words."""
    kwargs: dict[str, object] = {}
    named = finding_code(facts.label)
    if facts.assessable:
        if named is not None:
            kwargs["finding_type"] = named
        if facts.covid is not None:
            kwargs["qualitative_evaluations"] = [hd.sr.QualitativeEvaluation(
                COVID19, codes.SCT.Yes if facts.covid else codes.SCT.No)]
    group = _group(DECISION_TRACKING, facts, source, **kwargs)
    items = group[0].ContentSequence
    items.append(_text(codes.DCM.Conclusion, facts.conclusion))
    note = f"{RESEARCH_ONLY} Made by software; not verified by a person. {facts.rule}"
    site = f" Site: {facts.site}." if facts.site else ""
    items.append(_text(codes.DCM.Comment, note + site + (f" {facts.source_note}" if facts.source_note else "")))
    if capture is not None:
        items.append(hd.sr.ImageContentItem(name=codes.DCM.IllustrationOfFinding,
                                            referenced_sop_class_uid=capture.SOPClassUID,
                                            referenced_sop_instance_uid=capture.SOPInstanceUID,
                                            relationship_type="CONTAINS"))
    return group


def _class_group(cls: str, p: float, facts: ReportFacts,
                 source: Dataset | None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One class's probability, its finding coded (or named in a text item when it has no code here)."""
    code = finding_code(cls)
    group = _group(f"covidxr probability {cls}", facts, source, finding_type=code, measurements=[_probability(p)])
    if code is None:
        group[0].ContentSequence.append(_text(codes.DCM.Finding, cls))
    return group


def _describable(source: Dataset | None) -> bool:
    """Whether the Image Library can describe the source: a projection radiograph's entry needs its Imager Pixel
    Spacing, which many exports leave out (the group's source image reference names it either way)."""
    return source is not None and "Rows" in source and "ImagerPixelSpacing" in source


def structured_report(facts: ReportFacts, evidence: Sequence[Dataset], *,
                      source: Dataset | None, capture: Dataset | None, series_description: str,
                      manufacturer: str) -> hd.sr.ComprehensiveSR:
    """The SR of one image, in the first evidence's study, in a new series, VerificationFlag UNVERIFIED.

    Args:
        facts: what to say.
        evidence: the instances the report rests on; the first gives the patient and study (its Patient and Study
            modules are copied).
        source: the analysed DICOM image's header, referenced in the content (None for a non-DICOM input).
        capture: the Secondary Capture written with it, referenced in the content (None when none was written).
        series_description: the new series' description.
        manufacturer: the Manufacturer of the report's equipment.

    Returns:
        The SR dataset.
    """
    groups = [_decision_group(facts, source, capture)]
    if facts.assessable:
        groups += [_class_group(c, p, facts, source) for c, p in facts.probs.items()]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"covidxr {facts.arch}", manufacturer_name=manufacturer))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device), procedure_reported=PROCEDURE,
        imaging_measurements=groups, referenced_images=[source] if _describable(source) else None)
    with warnings.catch_warnings():  # highdicom's doubts about the source's own patient name; it is copied as is
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.ComprehensiveSR(
            evidence=list(evidence), content=report[0], series_instance_uid=hd.UID(), series_number=901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer, is_complete=True,
            is_final=False, is_verified=False, series_description=series_description,
            software_versions=facts.version)
