"""How a dataset's own values become manifest columns: class names (``--classes``), source names, frontal views.

``--classes`` (:func:`parse_class_spec`) maps and merges labels after an adapter's default mapping: either a list
of kept classes (``covid,normal``) or ``new=old,old;new=old`` entries (``covid=covid,COVID-19;non-covid=normal,
pneumonia,Lung_Opacity``). Names are matched case-insensitively against, in this order: the dataset's own label
(``original_label``); the levels of a hierarchical finding from the most specific down to, but not including,
the top level (``SARS``, then ``Viral`` for ``Pneumonia/Viral/SARS``); then the default class. So
``covid,pneumonia`` keeps ``Pneumonia/Viral/COVID-19`` as covid (the top level ``Pneumonia`` is never matched on
its own), and ``sars=SARS;pneumonia`` splits SARS off the other pneumonias and drops covid. Rows that map to
nothing are dropped and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import urlparse

import pandas as pd

from covidxr.errors import DatasetError

# (substring of "host/path" of a URL, lower case) -> short source name; the first match wins.
KNOWN_SOURCES: tuple[tuple[str, str], ...] = (
    ("github.com/ieee8023/covid-chestxray-dataset", "ieee8023"),
    ("paultimothymooney/chest-xray-pneumonia", "kermany"),
    ("data.mendeley.com/datasets/rscbjbr9sj", "kermany"),
    ("rsna-pneumonia-detection-challenge", "rsna"),
    ("bimcv", "bimcv"),
    ("padchest", "bimcv"),
    ("github.com/ml-workgroup/covid-19-image-repository", "hannover"),
    ("github.com/armiro/covid-cxnet", "covid-cxnet"),
    ("figure1-covid-chestxray-dataset", "figure1"),
    ("actualmed-covid-chestxray-dataset", "actualmed"),
    ("sirm.org", "sirm"),
    ("eurorad.org", "eurorad"),
    ("radiopaedia.org", "radiopaedia"),
    ("twitter.com", "twitter"),
    ("nih.gov", "nih"),
)


def name_key(name: str) -> str:
    """Normalise a class, folder or view name for matching: case-folded, spaces collapsed."""
    return re.sub(r"\s+", " ", str(name)).strip().casefold()


def parse_class_spec(spec: str) -> dict[str, str]:
    """Parse a ``--classes`` spec into ``{normalised old name: new class}``.

    Args:
        spec: ``"covid,normal"`` (keep these classes) or ``"covid=covid,COVID-19;non-covid=normal,pneumonia"``
            (map the names after ``=`` to the class before it); entries without ``=`` keep their own names.

    Returns:
        The mapping; keys are normalised with case folding.

    Raises:
        DatasetError: empty spec or entry, or a name mapped to two different classes.
    """
    mapping: dict[str, str] = {}
    entries = [e for e in re.split(r"[;]" if "=" in spec else r"[;,]", spec) if e.strip()]
    if not entries:
        raise DatasetError(f"--classes {spec!r} names no class; e.g. 'covid,normal' or 'covid=covid;other=normal'")
    for entry in entries:
        new, sep, olds = entry.partition("=")
        new = new.strip()
        names = [o.strip() for o in olds.split(",")] if sep else [new]
        if not new or not any(names):
            raise DatasetError(f"--classes entry {entry.strip()!r} is incomplete; expected NEW=OLD[,OLD...]")
        for old in filter(None, names):
            previous = mapping.setdefault(name_key(old), new)
            if previous != new:
                raise DatasetError(f"--classes maps {old!r} to both {previous!r} and {new!r}")
    return mapping


def _candidates(original: str, default: str) -> list[str]:
    """Names a row can be matched by, in the order given in the module docstring."""
    parts = [p.strip() for p in original.split("/") if p.strip()]
    return [original, *reversed(parts[1:]), default]


def apply_classes(table: pd.DataFrame, mapping: dict[str, str] | None) -> tuple[pd.DataFrame, Counter]:
    """Map labels with a parsed ``--classes`` spec and drop the rows that map to nothing.

    Args:
        table: adapter output with ``label`` (default class, ``""`` when the adapter has none) and
            ``original_label``.
        mapping: output of :func:`parse_class_spec`, or None to keep the default classes.

    Returns:
        The kept rows (index reset) and a counter of dropped rows by reason.
    """
    if mapping is None:
        labels = table["label"]
    else:
        labels = pd.Series([
            next((mapping[name_key(c)] for c in _candidates(orig, default) if c and name_key(c) in mapping), "")
            for orig, default in zip(table["original_label"], table["label"], strict=True)
        ], index=table.index, dtype=object)
    keep = labels != ""
    why = "not in --classes" if mapping is not None else "no default class"
    dropped = Counter(f"label {orig!r} {why}" for orig in table.loc[~keep, "original_label"])
    return table.assign(label=labels)[keep].reset_index(drop=True), dropped



def source_from_url(url: str) -> str:
    """Return a short name for the collection a URL points to.

    Known collections (``KNOWN_SOURCES``) get their usual name (``ieee8023``, ``kermany``, ``rsna``, ``bimcv``,
    ``sirm``, ``eurorad``, ``radiopaedia``, ...). Other GitHub and Kaggle URLs give ``owner/name``; anything else
    its host name without ``www.``. An empty URL gives ``unknown``.
    """
    text = str(url or "").strip()
    if not text or text.lower() in ("nan", "none"):
        return "unknown"
    parsed = urlparse(text if "://" in text else f"https://{text}")
    host = (parsed.hostname or "").removeprefix("www.")
    where = f"{host}{parsed.path}".lower()
    for pattern, name in KNOWN_SOURCES:
        if pattern in where:
            return name
    segments = [s for s in parsed.path.split("/") if s]
    if host in ("github.com", "kaggle.com") and len(segments) >= 2:
        return "/".join(segments[-2:] if host == "kaggle.com" else segments[:2])
    return host or "unknown"


def is_frontal(view: str) -> bool:
    """Return True for PA/AP views (``PA``, ``AP``, ``AP Supine``, ``AP semi erect``), False for the rest."""
    words = name_key(view).replace("-", " ").split()
    return bool(words) and words[0] in ("pa", "ap")

