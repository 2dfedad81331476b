"""Is an image one the model can assess? The single place where the page decides to show or withhold a result.

:func:`assess` reads the input gate's verdict that the predictor attaches to each prediction (``Prediction.gate``:
file checks, a learned view check and an out-of-distribution check, see ``covidxr.inference.gate``). A prediction
without a verdict (a predictor from before the gate) falls back to the file checks below: colour, a tiny image and
the DICOM header's modality, body part and view. Switching the page to another rule means changing this module only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from covidxr.io import Xray

TINY_SIDE = 128
SMALL_SIDE = 256
CHEST_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "CHESTWALL"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "L", "R", "LEFT LATERAL", "RIGHT LATERAL"})
OBLIQUE_VIEWS = frozenset({"RAO", "LAO", "RPO", "LPO", "RLO", "LLO", "OBL", "OBLIQUE"})
RADIOGRAPHY = frozenset({"CR", "DX", "DR", "RG"})


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


def file_checks(xray: Xray) -> tuple[list[str], list[str]]:
    """Checks that need no model: colour, size and the DICOM header.

    Returns:
        ``(reasons to refuse, warnings)``, without file names (they may go into the audit log).
    """
    reasons, warnings = [], []
    if xray.color:
        reasons.append("a colour image (a photograph or a tinted picture?), not a plain radiograph")
    height, width = xray.pixels.shape[:2]
    if min(height, width) < TINY_SIDE:
        reasons.append(f"too small ({width} x {height} px; at least {TINY_SIDE} px a side needed)")
    elif min(height, width) < SMALL_SIDE:
        warnings.append(f"a small image ({width} x {height} px): fine detail is missing and the result is less "
                        "reliable")
    header = xray.header or {}
    modality = str(header.get("Modality", "")).strip().upper()
    if modality and modality not in RADIOGRAPHY:
        reasons.append(f"the DICOM modality is {modality}, not a plain radiograph (CR/DX)")
    part = str(header.get("BodyPartExamined", "")).strip().upper()
    if part and part not in CHEST_PARTS:
        reasons.append(f"the DICOM body part is {part}, not the chest")
    view = str(header.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        reasons.append(f"the DICOM view position is {view}: a lateral view, not a frontal one (PA/AP)")
    elif view in OBLIQUE_VIEWS:
        reasons.append(f"the DICOM view position is {view}: an oblique view, not a frontal one (PA/AP)")
    return reasons, warnings


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
    return Assessment(not reasons, tuple(reasons), tuple(warnings), "file checks")
