"""The calibration of a trained model as one object: the probability temperature, the decision thresholds, and where
they came from as an :class:`Origin` (an enum, not prose).

A :class:`Calibration` is read once, by :meth:`covidxr.model.trained.TrainedModel.load`, from the checkpoint's
sidecar (:mod:`covidxr.model.calibration_file`), and made by the evaluation when it fits a new one
(:meth:`Calibration.fitted`, :meth:`Calibration.with_thresholds`). The English sentence that says how a temperature
was fitted (``how``) is kept for the report and metrics.json; code decides on :attr:`Calibration.origin` only.
Sidecars written before the origin was recorded are read by :func:`origin_of` (the only place that reads the prose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from covidxr.errors import CheckpointError


class Origin(Enum):
    """Where a temperature (and the thresholds chosen with it) came from."""

    NONE = "none"  # uncalibrated: temperature 1
    VALIDATION = "validation"  # fitted on the run's validation split
    OUT_OF_SOURCE = "out_of_source"  # fitted on the held-out sources of a cross-validation by source
    CHECKPOINT = "checkpoint"  # a temperature stored inside an old checkpoint (no sidecar)
    REUSED = "reused"  # an evaluation of other data reusing the model's stored calibration, not refitting it
    SITE = "site"  # a site profile's temperature (python -m covidxr.adapt)

    @property
    def fitted(self) -> bool:
        """Whether this calibration was fitted by the evaluation that reports it (on validation or out of source)."""
        return self in (Origin.VALIDATION, Origin.OUT_OF_SOURCE)


def origin_of(how: str) -> Origin:
    """The origin of a sidecar written before origins were recorded, from its sentence (the one place that reads
    the prose)."""
    text = (how or "").strip().lower()
    if text.startswith("fitted out of source"):
        return Origin.OUT_OF_SOURCE
    if text.startswith("fitted"):
        return Origin.VALIDATION
    if text.startswith("reused"):
        return Origin.REUSED
    return Origin.NONE


def check_temperature(value: Any, source: str = "calibration") -> float:
    """``value`` as a positive finite temperature (None: 1.0).

    Raises:
        CheckpointError: not a positive finite number (``source`` names the file in the message).
    """
    try:
        temperature = float(value if value is not None else 1.0)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: temperature {value!r} is not a number") from exc
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"{source}: temperature must be a positive number, got {value!r}")
    return temperature


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Calibration:
    """A model's probability temperature and decision thresholds, and where they came from.

    Attributes:
        temperature: the probability temperature (1.0: uncalibrated).
        origin: where it came from.
        how: the sentence for people (metrics.json, the report), e.g. "fitted on the run's validation split (622
            images)".
        summary: the stored evaluation summary (:func:`covidxr.evaluation.outputs.evaluation_summary`): its
            ``operating_points`` and ``covid_vs_rest`` hold the thresholds the predictor and the app decide with.
    """

    temperature: float = 1.0
    origin: Origin = Origin.NONE
    how: str = "none: probabilities uncalibrated"
    summary: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if not isinstance(self.summary, MappingProxyType):
            object.__setattr__(self, "summary", _frozen(self.summary))

    @classmethod
    def from_sidecar(cls, record: Mapping[str, Any], source: str = "calibration") -> Calibration:
        """The calibration in a sidecar record (:func:`covidxr.model.calibration_file.read_calibration`)."""
        how = str(record.get("temperature_how") or "")
        stored = record.get("temperature_origin")
        origin = Origin(stored) if stored in {o.value for o in Origin} else origin_of(how)
        return cls(check_temperature(record.get("temperature"), source), origin, how or origin.value,
                   record.get("evaluation") or {})

    @classmethod
    def from_checkpoint_entries(cls, temperature: Any, evaluation: Mapping[str, Any] | None,
                                source: str = "checkpoint") -> Calibration:
        """The calibration an old checkpoint carried inside (``ckpt["temperature"]`` and ``ckpt["evaluation"]``)."""
        if temperature is None and not evaluation:
            return cls()
        return cls(check_temperature(temperature, source), Origin.CHECKPOINT,
                   "stored in the checkpoint (an older run)", evaluation or {})

    @classmethod
    def fitted(cls, temperature: float, origin: Origin, how: str) -> Calibration:
        """A temperature an evaluation has just fitted (thresholds follow with :meth:`with_thresholds`)."""
        return cls(temperature, origin, how)

    @property
    def operating_points(self) -> Mapping[str, Any]:
        """The stored operating points (``{"positive", "points": [...]}``), empty when none."""
        return self.summary.get("operating_points") or {}

    @property
    def covid_vs_rest(self) -> Mapping[str, Any] | None:
        """The stored COVID-vs-rest threshold record (``positive``, ``threshold``, ``chosen_on``), or None."""
        return self.summary.get("covid_vs_rest")

    def with_thresholds(self, temperature: float, origin: Origin, how: str, operating_points: Any = None,
                        covid_vs_rest: Mapping[str, Any] | None = None) -> Calibration:
        """This calibration as an evaluation leaves it: its temperature and the thresholds it chose on validation."""
        summary = dict(self.summary)
        if operating_points:
            summary["operating_points"] = operating_points
        if covid_vs_rest:
            summary["covid_vs_rest"] = {k: covid_vs_rest[k] for k in ("positive", "threshold", "chosen_on")}
        return replace(self, temperature=temperature, origin=origin, how=how, summary=_frozen(summary))

    def to_dict(self) -> dict[str, Any]:
        """``{"temperature", "origin", "how"}`` for metrics.json and logs."""
        return {"temperature": self.temperature, "origin": self.origin.value, "how": self.how}
