"""The input gate's file checks: what can be told about an image without a model (colour, size, the DICOM header).

Used by :mod:`covidxr.model.gate`; the reasons are plain words a reader can act on, without file names (they may
go into the audit log).
"""

from __future__ import annotations

from covidxr.images.reader import Xray

TINY_SIDE = 128  # refused below this: the network input is upscaled from a thumbnail
SMALL_SIDE = 256  # a warning below this: fine detail is missing
RADIOGRAPHY = frozenset({"CR", "DX", "DR", "RG"})
CHEST_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "CHESTWALL"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "L", "R", "LEFT LATERAL", "RIGHT LATERAL"})
OBLIQUE_VIEWS = frozenset({"RAO", "LAO", "RPO", "LPO", "RLO", "LLO", "OBL", "OBLIQUE"})

def file_checks(xray: Xray) -> tuple[list[tuple[str, str]], list[str]]:
    """The checks that need no model: colour, size and the DICOM header.

    Returns:
        ``([(check code, reason to refuse)], warnings)``, in plain language without file names (they may go into the
        audit log).
    """
    reasons, warnings = [], []
    if xray.color:
        reasons.append(("colour", "This is a colour picture (a photograph?), not a greyscale chest X-ray"))
    height, width = xray.pixels.shape[:2]
    if min(height, width) < TINY_SIDE:
        reasons.append(("size", f"The image is too small ({width} x {height} px; at least {TINY_SIDE} px a side "
                                "needed)"))
    elif min(height, width) < SMALL_SIDE:
        warnings.append(f"a small image ({width} x {height} px): fine detail is missing and the result is less "
                        "reliable")
    header = xray.header or {}
    modality = str(header.get("Modality", "")).strip().upper()
    if modality and modality not in RADIOGRAPHY:
        kind = "a CT scan" if modality == "CT" else f"modality {modality}"
        reasons.append(("dicom", f"The DICOM header says {kind}, not a plain X-ray (CR/DX)"))
    part = str(header.get("BodyPartExamined", "")).strip().upper()
    if part and part not in CHEST_PARTS:
        reasons.append(("dicom", f"The DICOM header says the body part is {part}, not the chest"))
    view = str(header.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        reasons.append(("dicom", f"The DICOM header says a side (lateral) view ({view}): the model reads only "
                                 "frontal views (PA/AP)"))
    elif view in OBLIQUE_VIEWS:
        reasons.append(("dicom", f"The DICOM header says an oblique view ({view}): the model reads only frontal "
                                 "views (PA/AP)"))
    return reasons, warnings
