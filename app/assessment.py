"""Is an image one the model can assess? The single place where the page decides to show or withhold a result.

:func:`assess` reads the input gate's verdict that the predictor attaches to each prediction (``Prediction.gate``, see
``covidxr.model.gate``): file checks (colour, a tiny image, the DICOM header's modality, body part and view), and
when the checkpoint has a fitted gate a learned view check (rotated, inverted, lateral, CT slice, photograph,
document) and an out-of-distribution check whose borderline band gives a third verdict: assessed, but marked as an
unusual film. A prediction without a verdict (a predictor from before the gate) gets the gate's file checks here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from covidxr.images.reader import Xray

BORDERLINE = "unusual film: read with care"  # covidxr.model.gate.BORDERLINE (not imported: it loads torch)


@dataclass(frozen=True)
class Assessment:
    """Whether the page shows the model's output for an image.

    Attributes:
        assessable: False when the image is refused ("Not assessed: ...").
        reasons: why it was refused, the most likely first (empty when assessable); plain language, no file
            names.
        warnings: caveats shown with an assessed result.
        by: which of the gate's checks ran: ``"file and learned checks"`` or ``"file checks"``.
        note: why the learned checks did not run, when they did not (shown as a caption).
        view_probs: the gate's view probabilities (frontal, rotated, ...), when it ran its learned checks.
        ood_distance: the gate's distance from the training films, when measured.
        ood_threshold: the distance above which images are borderline (refused beyond the band).
        borderline: assessed, but an unusual film (:data:`BORDERLINE`): output shown and marked.
    """

    assessable: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    by: str = "file checks"
    note: str | None = None
    view_probs: Mapping[str, float] | None = None
    ood_distance: float | None = None
    ood_threshold: float | None = None
    borderline: bool = False

    @property
    def reason(self) -> str:
        """The most likely reason, starting with a capital ("" when assessable): the page gives one."""
        text = self.reasons[0] if self.reasons else ""
        return text[:1].upper() + text[1:]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict for the result download and the audit log."""
        return {"assessable": self.assessable, "reasons": list(self.reasons), "warnings": list(self.warnings),
                "by": self.by, "note": self.note, "view_probs": dict(self.view_probs) if self.view_probs else None,
                "ood_distance": self.ood_distance, "ood_threshold": self.ood_threshold,
                "borderline": self.borderline}


def _field(verdict: Any, name: str, default: Any = None) -> Any:
    """A field of a verdict object or mapping."""
    return verdict.get(name, default) if isinstance(verdict, Mapping) else getattr(verdict, name, default)


def _from_gate(verdict: Any, unavailable: str | None) -> Assessment:
    """An :class:`Assessment` from the gate's verdict (an object or its ``to_dict()``)."""
    reasons = _field(verdict, "reasons") or ()
    if not reasons and _field(verdict, "reason"):
        reasons = (str(_field(verdict, "reason")),)
    learned = bool(_field(verdict, "learned", False))
    return Assessment(bool(_field(verdict, "assessable", True)), tuple(map(str, reasons)),
                      tuple(map(str, _field(verdict, "warnings") or ())),
                      "file and learned checks" if learned else "file checks", None if learned else unavailable,
                      _field(verdict, "view_probs"), _field(verdict, "ood_distance"), _field(verdict, "ood_threshold"),
                      bool(_field(verdict, "borderline", False)))


def assess(xray: Xray, prediction: Any, unavailable: str | None = None) -> Assessment:
    """The verdict on one image: the input gate's, from the prediction (the gate's file checks when it has none).

    Args:
        xray: the decoded image.
        prediction: the predictor's output for it.
        unavailable: why the predictor's gate runs no learned checks (``InputGate.unavailable``), or None.

    Returns:
        The assessment.
    """
    verdict = getattr(prediction, "gate", None)
    if verdict is None:
        from covidxr.model.gate import file_checks

        failed, warnings = file_checks(xray)
        verdict = {"assessable": not failed, "reasons": [reason for _, reason in failed], "warnings": warnings}
    return _from_gate(verdict, unavailable)
