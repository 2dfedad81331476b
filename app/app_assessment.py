"""Is an image one the model can assess? The single place where the page decides to show or withhold a result.

:func:`assess` reads the input gate's verdict that the predictor attaches to each prediction (``Prediction.gate``:
file checks, a learned view check and an out-of-distribution check, see ``covidxr.inference.gate``). A prediction
without a verdict falls back to the gate's own file checks (colour, a tiny image, the DICOM header's modality, body
part and view). Switching the page to another rule means changing this module only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from covidxr.inference.gate import file_checks
from covidxr.io import Xray


@dataclass(frozen=True)
class Assessment:
    """Whether the page shows the model's output for an image.

    Attributes:
        assessable: False when the image is refused ("Not assessed: ...").
        reasons: why it was refused (empty when assessable); plain language, no file names.
        warnings: caveats shown with an assessed result.
        by: what decided: ``"input gate"`` or ``"file checks"``.
        view_probs: the gate's view probabilities (frontal, rotated, ...), when it ran its learned checks.
        ood_distance: the gate's distance from the training films, when measured.
        ood_threshold: the distance above which images are refused.
    """

    assessable: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    by: str = "file checks"
    view_probs: Mapping[str, float] | None = None
    ood_distance: float | None = None
    ood_threshold: float | None = None

    @property
    def reason(self) -> str:
        """All reasons on one line, starting with a capital ("" when assessable)."""
        text = "; ".join(self.reasons)
        return text[:1].upper() + text[1:]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict for the result download and the audit log."""
        return {"assessable": self.assessable, "reasons": list(self.reasons), "warnings": list(self.warnings),
                "by": self.by, "view_probs": dict(self.view_probs) if self.view_probs else None,
                "ood_distance": self.ood_distance, "ood_threshold": self.ood_threshold}


def _field(verdict: Any, name: str, default: Any = None) -> Any:
    """A field of a verdict object or mapping."""
    return verdict.get(name, default) if isinstance(verdict, Mapping) else getattr(verdict, name, default)


def _from_gate(verdict: Any) -> Assessment:
    """An :class:`Assessment` from the gate's verdict (an object or its ``to_dict()``)."""
    reasons = _field(verdict, "reasons") or ()
    if not reasons and _field(verdict, "reason"):
        reasons = (str(_field(verdict, "reason")),)
    distance, threshold = _field(verdict, "ood_distance"), _field(verdict, "ood_threshold")
    return Assessment(bool(_field(verdict, "assessable", True)), tuple(map(str, reasons)),
                      tuple(map(str, _field(verdict, "warnings") or ())), "input gate",
                      _field(verdict, "view_probs"), distance, threshold)


def assess(xray: Xray, prediction: Any) -> Assessment:
    """The verdict on one image: the input gate's when the prediction carries one, else the file checks.

    Args:
        xray: the decoded image.
        prediction: the predictor's output for it.

    Returns:
        The assessment.
    """
    verdict = getattr(prediction, "gate", None)
    if verdict is not None:
        return _from_gate(verdict)
    reasons, warnings = file_checks(xray)
    return Assessment(not reasons, tuple(text for _code, text in reasons), tuple(warnings), "file checks")
