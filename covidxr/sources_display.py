"""Readable names of the image sources: the dataset a film comes from, not the repository it was downloaded from.

Manifests record where each file was read (``source``: a GitHub ``owner/name``, sometimes with the dataset's name
in front, or an adapter's short tag such as ``ieee8023``). People reading a report or the app want the dataset:
"NIH ChestX-ray8", not "muhammedtalo/COVID-19". :func:`source_name` maps one to the other; names it does not know
come back unchanged, so a new source is shown as recorded rather than hidden.

Used by the app, the evaluation report and the data audit; it imports nothing from covidxr.
"""

from __future__ import annotations

from collections.abc import Iterable

# Matched case-insensitively as substrings of the recorded source, in this order (the first match wins).
_DATASETS: tuple[tuple[str, str], ...] = (
    ("nih chestx-ray", "NIH ChestX-ray8"),
    ("muhammedtalo/covid-19", "NIH ChestX-ray8"),
    ("hannover", "Hannover Medical School COVID-19"),
    ("ml-workgroup/covid-19-image-repository", "Hannover Medical School COVID-19"),
    ("covid-cxnet", "COVID-CXNet"),
    ("cxnet", "COVID-CXNet"),
    ("openist", "chest X-ray teaching films"),
    ("pi-null-mezon", "chest X-ray teaching films"),
    ("lecuong1502/btl_machine_learning", "Kermany paediatric (Guangzhou)"),
    ("kermany", "Kermany paediatric (Guangzhou)"),
    ("covid-chestxray-dataset", "ieee8023 COVID-19 image collection"),
    ("ieee8023", "ieee8023 COVID-19 image collection"),
    ("siim-fisabio-rsna", "SIIM-FISABIO-RSNA (Valencia + RSNA RICORD)"),
    ("vikasb512/capstone-project", "SIIM-FISABIO-RSNA (Valencia + RSNA RICORD)"),
    ("torchxrayvision", "RSNA Pneumonia / NIH (torchxrayvision test DICOMs)"),
)


def source_name(source: object) -> str:
    """The dataset name of a recorded source (``"hida6/covid-chestxray-dataset"`` -> "ieee8023 COVID-19 image
    collection"); an unknown source is returned as given (stripped), an empty one as "(unknown source)"."""
    text = str(source if source is not None else "").strip()
    if not text:
        return "(unknown source)"
    if " + " in text:  # several sources already joined for display
        return " + ".join(dict.fromkeys(source_name(part) for part in text.split(" + ")))
    lowered = text.lower()
    return next((name for key, name in _DATASETS if key in lowered), text)


def readable(text: str, sources: Iterable[object]) -> str:
    """``text`` with every recorded source name in it replaced by its dataset name (longest names first, so a
    repository name inside a longer recorded name is not replaced twice). For messages such as confounding warnings
    that quote the recorded names."""
    for source in sorted({str(s) for s in sources if str(s).strip()}, key=len, reverse=True):
        text = text.replace(source, source_name(source))
    return text
