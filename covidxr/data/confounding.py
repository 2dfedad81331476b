"""Class/source confounding: a class that comes mostly from one source, or a source that gives a single class.

A network trained on such data can learn the source (hospital, scanner, age group, image processing) instead of the
disease. :func:`confounding_warnings` reads labels and sources only, so training and evaluation call it before
touching any image; the dataset audit reports it too.
"""

from __future__ import annotations

import pandas as pd

CONFOUNDING_SHARE = 0.8
"""A class is confounded with a source when at least this share of its images comes from that source."""

UNKNOWN = "(unknown)"
"""How a blank ``source`` is shown."""


def source_column(table: pd.DataFrame) -> pd.Series:
    """Return the ``source`` column with blanks (or no column at all) shown as ``(unknown)``."""
    column = table["source"] if "source" in table.columns else pd.Series("", index=table.index)
    return column.fillna("").astype(str).str.strip().replace("", UNKNOWN)


def confounding_warnings(table: pd.DataFrame, share: float = CONFOUNDING_SHARE) -> list[str]:
    """Return one warning per class/source confounding in ``table`` (labels and sources only; reads no image).

    Warns when a class comes for at least ``share`` of its images from one source, and when a source contributes
    images of a single class. Nothing is said when the whole table has one source (nothing to confound with), and
    one warning is given when no source is known at all.

    Args:
        table: a manifest table with ``label`` and (optionally) ``source`` columns.
        share: the dominance threshold, a fraction in (0, 1].

    Returns:
        Human-readable warnings, empty when nothing was found.
    """
    if table.empty:
        return []
    sources = source_column(table)
    if (sources == UNKNOWN).all():
        return ["no image has a source: confounding between class and source cannot be checked"]
    counts = pd.crosstab(table["label"], sources)
    if counts.shape[1] < 2:
        return []
    out = []
    for label, row in counts.iterrows():
        top, n = row.idxmax(), int(row.max())
        total = int(row.sum())
        if n / total >= share:
            out.append(f"class {label!r}: {n} of {total} images ({n / total:.0%}) come from source {top!r}; "
                       "a model can learn the source instead of the class")
    if counts.shape[0] >= 2:
        for source, column in counts.items():
            present = column[column > 0]
            if len(present) == 1:
                out.append(f"source {source!r} contributes only class {present.index[0]!r} "
                           f"({int(present.iloc[0])} images): the source alone predicts the label")
    return out
