"""metrics.json as typed records, and its one reader and writer.

``python -m covidxr.evaluate`` builds an :class:`EvaluationRecord` and writes it with :func:`record_json`; the report,
``covidxr.compare`` and the app read a metrics.json back with :func:`read_record` (files:
``covidxr.evaluation.results.load_evaluation``), so the file has one definition, these classes, and writer and reader
cannot drift apart: a key the writer adds without a field here is refused when it writes.

Every field may be missing (None) so that an evaluation made before a section existed still reads; a key this version
does not know, or a value of the wrong kind, is refused with a one-line :class:`MetricsShapeError`. The shapes older
versions wrote are turned into the current one in one place, :func:`upgrade`. The parts that other modules own and
nobody reads field by field here (the reproducibility record, the model card, the gate report, the failure gallery and
subgroups, the checklist, the cross-validation by source as crossval.json has it) stay JSON objects.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from covidxr.errors import CovidxrError

OPTIONAL = {"omit_if_none": True}
"""Field metadata: the key is left out of the file when its value is None (the writer writes it only sometimes)."""

Record = TypeVar("Record")


class MetricsShapeError(CovidxrError):
    """A metrics.json this version cannot read (unknown key, wrong kind of value, not an evaluation at all)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its patient-bootstrap interval (``lo``, ``hi``: None without one)."""

    estimate: float | None = None
    lo: float | None = None
    hi: float | None = None
    n_valid: int | None = field(default=None, metadata=OPTIONAL)  # resamples where the metric was defined
    n_skipped: int | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class ClassMetrics:
    """One class against the rest when the model names its most likely class (``recall`` is the sensitivity)."""

    precision: float | None = None
    recall: float | None = None
    specificity: float | None = None
    npv: float | None = None
    f1: float | None = None
    support: int | None = None  # images of the class
    n_predicted: int | None = None  # images the model gave this class
    roc_auc: float | None = None
    average_precision: float | None = None


@dataclass(frozen=True)
class Metrics:
    """The metrics of one evaluated set (``covidxr.evaluation.metrics.classification_metrics``)."""

    n: int | None = None
    classes: list[str] | None = None
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    f1_macro: float | None = None
    f1_weighted: float | None = None
    cohen_kappa: float | None = None
    mcc: float | None = None
    roc_auc_macro: float | None = None
    average_precision_macro: float | None = None
    macro_excluded_classes: list[str] | None = None  # classes left out of the macro averages (absent from the set)
    brier: float | None = None
    log_loss: float | None = None
    ece: float | None = None
    confusion_matrix: list[list[int]] | None = None  # rows: true class, columns: predicted class
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)


@dataclass(frozen=True)
class Intervals:
    """metrics.json's ``ci``: the patient-bootstrap intervals of the headline metrics and, per class, of the
    sensitivity and specificity."""

    metrics: dict[str, Interval] = field(default_factory=dict)
    per_class: dict[str, dict[str, Interval]] = field(default_factory=dict)
    n_resamples: int | None = None
    seed: int | None = None
    alpha: float | None = None
    n_groups: int | None = None  # patients
    n: int | None = None  # images
    method: str | None = None


@dataclass(frozen=True)
class CalibrationResult:
    """The temperature an evaluation used, where it came from (``how`` in words, ``origin`` as a
    :class:`covidxr.model.calibration.Origin` value; absent before issue #28), and the calibration before and after."""

    temperature: float | None = None
    how: str | None = None
    origin: str | None = field(default=None, metadata=OPTIONAL)
    ece_before: float | None = None
    ece_after: float | None = None
    brier_before: float | None = None
    brier_after: float | None = None
    n_bins: int | None = None
    measured_on: str | None = None
    why_not_out_of_source: str | None = field(default=None, metadata=OPTIONAL)  # the run's own data only


@dataclass(frozen=True)
class Counts:
    """A 2x2 table of one threshold on one split."""

    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0


@dataclass(frozen=True)
class ThresholdRow:
    """One operating point: the threshold chosen on validation for a target sensitivity, and what it gave."""

    target_sensitivity: float | None = None
    threshold: float | None = None
    val_sensitivity: float | None = None
    val_specificity: float | None = None
    test_sensitivity: float | None = None
    test_specificity: float | None = None
    val_counts: Counts | None = None
    test_counts: Counts | None = None
    reason: str | None = None  # why there is no threshold or no test figure


@dataclass(frozen=True)
class OperatingPoints:
    """metrics.json's ``operating_points``: thresholds of the positive class for target sensitivities."""

    positive: str | None = None
    score: str | None = None
    chosen_on: str | None = None
    points: list[ThresholdRow] = field(default_factory=list)


@dataclass(frozen=True)
class CovidSet:
    """COVID or not on one set of films: AUC, and sensitivity and specificity at ``threshold`` (None: AUC only)."""

    name: str | None = None  # "internal test", "internal test: SOURCE", "held out: SOURCE", "external NAME"
    n_positive: int | None = None
    n_negative: int | None = None
    threshold: float | None = None
    auc: Interval | None = None
    sensitivity: Interval | None = None
    specificity: Interval | None = None


@dataclass(frozen=True)
class CovidVsRest:
    """metrics.json's ``covid_vs_rest``: the one threshold, fixed before testing, and every set scored with it."""

    positive: str | None = None
    threshold: float | None = None
    chosen_on: str | None = None
    sets: list[CovidSet] = field(default_factory=list)


@dataclass(frozen=True)
class GroupClass:
    """One class within a group (a source or a view)."""

    sensitivity: float | None = None
    specificity: float | None = None
    support: int | None = None


@dataclass(frozen=True)
class GroupMetrics:
    """The metrics of the images of one source or one view (``covidxr.evaluation.metrics.group_metrics``)."""

    n: int | None = None
    small: bool | None = None  # too few images to judge
    class_counts: dict[str, int] | None = None
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    f1_macro: float | None = None
    roc_auc_macro: float | None = None
    macro_excluded_classes: list[str] | None = None
    per_class: dict[str, GroupClass] | None = None


@dataclass(frozen=True)
class Baseline:
    """A classifier that sees only one metadata column (source or view), learned on the run's training images."""

    column: str | None = None
    learned_on: str | None = None
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    roc_auc_macro: float | None = None
    seen_share: float | None = None  # share of the images whose value the baseline saw in training


@dataclass(frozen=True)
class LungShare:
    """The share of the Grad-CAM mass inside the lungs over a split, or (``mean`` None) a ``note`` saying why not."""

    mean: float | None = None
    median: float | None = None
    n: int | None = None
    method: str | None = None
    note: str | None = field(default=None, metadata=OPTIONAL)
    lung_model: str | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class ExternalSet:
    """One external test set: an ``--external`` folder of metrics.json's ``external`` list, or an evaluation of
    external data beside the checkpoint (:meth:`EvaluationRecord.as_external_set`)."""

    name: str | None = None
    data: str | None = None
    n_images: int | None = None
    n_patients: int | None = None
    class_counts: dict[str, int] | None = None
    metrics: Metrics | None = None
    ci: Intervals | None = None
    by_source: dict[str, GroupMetrics] | None = None
    by_view: dict[str, GroupMetrics] | None = None
    baselines: dict[str, Baseline | None] | None = None
    calibration: CalibrationResult | None = None
    operating_points: OperatingPoints | None = None
    covid_vs_rest: CovidVsRest | None = None
    absent_class_calls: dict[str, int] | None = None  # films called a class the set has none of
    warnings: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    predictions: str | None = None  # its predictions CSV in the evaluation folder
    lung_share: LungShare | None = None
    gate: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class EvaluationRecord:
    """The content of one metrics.json (``python -m covidxr.evaluate``)."""

    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    split: str | None = None
    data: str | None = None
    data_is_external: bool | None = None
    n_images: int | None = None
    n_patients: int | None = None
    classes: list[str] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    metrics_uncalibrated: Metrics | None = None
    ci: Intervals | None = None
    calibration: CalibrationResult | None = None
    operating_points: OperatingPoints | None = None
    covid_vs_rest: CovidVsRest | None = None
    by_source: dict[str, GroupMetrics] | None = None
    by_view: dict[str, GroupMetrics] | None = None
    baselines: dict[str, Baseline | None] | None = None
    plots: dict[str, str] | None = None
    reproducibility: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    explain: list[dict[str, Any]] | None = None
    unreadable: dict[str, str] = field(default_factory=dict)
    model_card: dict[str, Any] | None = None
    external: list[ExternalSet] = field(default_factory=list)
    crossval: dict[str, Any] | None = None  # crossval.json's content (``covidxr.crossval.results``)
    lung_share: LungShare | None = None
    gate: dict[str, Any] | None = None  # ``covidxr.evaluation.gate_report``
    publication: dict[str, Any] | None = None  # ``covidxr.evaluation.publication``
    checklist: list[dict[str, Any]] | None = None  # ``covidxr.evaluation.checklist``
    summary: dict[str, Any] | None = None  # what the calibration sidecar stores (``evaluation_summary``)
    site: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # the site profile of ``--site``
    pdf: str | None = field(default=None, metadata=OPTIONAL)  # what ``--pdf`` did

    @property
    def crossval_folds(self) -> list[dict[str, Any]]:
        """The held-out sources of the cross-validation by source (possibly none)."""
        folds = (self.crossval or {}).get("folds") or (self.crossval or {}).get("rows") or []
        return [f for f in folds if isinstance(f, Mapping)]

    def as_external_set(self, name: str) -> ExternalSet:
        """This evaluation of external data as one external test set named ``name``."""
        return ExternalSet(name=name, data=self.data, n_images=self.n_images, n_patients=self.n_patients,
                           metrics=self.metrics, ci=self.ci, by_source=self.by_source, by_view=self.by_view,
                           baselines=self.baselines, calibration=self.calibration,
                           operating_points=self.operating_points, covid_vs_rest=self.covid_vs_rest,
                           warnings=list(self.warnings), unreadable=dict(self.unreadable),
                           lung_share=self.lung_share, gate=self.gate)


# ------------------------------------------------------------------------------------------ reading and writing


def upgrade(content: Mapping[str, Any]) -> dict[str, Any]:
    """The content of a metrics.json written by an older version, in today's shape (the one place that knows the
    old shapes).

    - ``"external": true/false`` (an evaluation of external data, before ``data_is_external``) becomes
      ``data_is_external``, and a single external set (an object, not a list) becomes a list of one;
    - an external set's calibration that gave only ``ece`` gives it as ``ece_after``;
    - a checkpoint's stored summary (``dataset``, ``report``, ``metrics_json``, ``created``; its external sets without
      metrics) reads as the evaluation it summarises.
    """
    data = dict(content)
    external = data.get("external")
    if isinstance(external, bool):
        data.setdefault("data_is_external", external)
        data["external"] = []
    elif isinstance(external, Mapping):
        data["external"] = [external]
    if "metrics_json" in data or "dataset" in data:  # the summary stored with the checkpoint
        data.setdefault("data", data.pop("dataset", None))
        for key in ("report", "metrics_json", "created"):
            data.pop(key, None)
        data["external"] = [e for e in data.get("external") or [] if isinstance(e, Mapping) and "metrics" in e]
    sets = []
    for entry in data.get("external") or []:
        calibration = entry.get("calibration") if isinstance(entry, Mapping) else None
        if isinstance(calibration, Mapping) and "ece" in calibration and "ece_after" not in calibration:
            calibration = {("ece_after" if k == "ece" else k): v for k, v in calibration.items()}
            entry = {**entry, "calibration": calibration}
        sets.append(entry)
    if "external" in data:
        data["external"] = sets
    return data


def read_record(content: Any, where: str = "metrics.json") -> EvaluationRecord:
    """The typed record of a metrics.json's content (old shapes upgraded first, :func:`upgrade`).

    Args:
        content: The parsed JSON.
        where: What to name in an error (the file).

    Raises:
        MetricsShapeError: Not an evaluation, a key this version does not know or a value of the wrong kind (one line:
            the file, the key's path and what is wrong).
    """
    if not isinstance(content, Mapping) or not isinstance(content.get("metrics"), Mapping):
        raise MetricsShapeError(f"{where}: not an evaluation of covidxr.evaluate (no 'metrics' object); evaluate "
                                "again with python -m covidxr.evaluate")
    try:
        return _build(EvaluationRecord, upgrade(content), "")
    except _Mismatch as exc:
        raise MetricsShapeError(f"{where}: unreadable by this version of covidxr ({exc}); evaluate again with "
                                "python -m covidxr.evaluate") from None


def evaluation_record(content: Mapping[str, Any]) -> EvaluationRecord:
    """The record of what ``covidxr.evaluate`` is about to write (JSON-ready values, today's shape only: nothing is
    upgraded, so a key the writer adds without adding its field here fails here, in the writer's tests).

    Raises:
        MetricsShapeError: A key without a field, or a value of the wrong kind.
    """
    try:
        return _build(EvaluationRecord, content, "")
    except _Mismatch as exc:
        raise MetricsShapeError(f"metrics.json does not fit its record ({exc})") from None


def record_json(record: Any) -> Any:
    """A record as JSON-ready values (:func:`dataclasses.asdict` without the optional keys that are None)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: record_json(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (f.metadata.get("omit_if_none") and getattr(record, f.name) is None)}
    if isinstance(record, Mapping):
        return {k: record_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [record_json(v) for v in record]
    return record


class _Mismatch(ValueError):
    """A value that does not fit its field (the message names the key's path)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[Record], value: Any, path: str) -> Record:
    """A record of ``cls`` from a JSON object, every key known and every value of its field's kind."""
    if not isinstance(value, Mapping):
        raise _Mismatch(f"{path or 'the file'}: expected an object, found {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise _Mismatch(f"unknown key {_join(path, unknown[0])!r}")
    hints = _hints(cls)
    return cls(**{k: _convert(hints[k], v, _join(path, k)) for k, v in value.items()})


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(kind: Any, value: Any, path: str) -> Any:
    """``value`` checked against the annotation ``kind`` (records built, numbers left as they are)."""
    if kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else _first_fit(inner, value, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(f"{path}: expected an object, found {type(value).__name__}")
        return {str(k): _convert(args[1], v, _join(path, k)) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(f"{path}: expected a list, found {type(value).__name__}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, path)
    fits = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[kind]
    if not isinstance(value, fits) or (kind is not bool and isinstance(value, bool)):
        raise _Mismatch(f"{path}: expected {kind.__name__}, found {type(value).__name__} {str(value)[:40]!r}")
    return value


def _first_fit(kinds: list[Any], value: Any, path: str) -> Any:
    errors = []
    for kind in kinds:
        try:
            return _convert(kind, value, path)
        except _Mismatch as exc:
            errors.append(exc)
    raise errors[0]
