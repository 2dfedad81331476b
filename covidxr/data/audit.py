"""Dataset audit: what a dataset really contains before any model is trained on it.

:func:`audit` reads every image once (through :func:`covidxr.images.reader.load_xray`) and reports:

* counts per class and per source (cross-table), per split when a split is given;
* patients per class and images per patient (max, mean); images whose patient id is per-image (the dataset had
  none, so a patient may hide in two splits);
* exact duplicates (identical file bytes, SHA-256) and near duplicates (256-bit dHash within 12 bits), see
  :mod:`covidxr.data.duplicates`;
* images that look wrong for the task: colour images (:attr:`covidxr.images.reader.Xray.color`), tiny images (shorter
side
  below ``TINY_SIDE`` = 256 px), non-frontal views (from the ``view`` column or the DICOM ViewPosition) and
  DICOM modalities other than CR/DX;
* class/source confounding (:func:`covidxr.data.confounding.confounding_warnings`);
* optionally, how well a linear probe on a checkpoint's backbone features predicts the source of an image
  (:func:`covidxr.data.source_probe.source_probe`).

:func:`covidxr.data.audit_report.write_report` renders the result as Markdown or HTML (plus ``audit.json``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from covidxr.data.confounding import CONFOUNDING_SHARE, confounding_warnings, source_column
from covidxr.data.duplicates import (
    HASH_SIZE,
    NEAR_DUPLICATE_BITS,
    describe_rows,
    dhash,
    duplicate_summary,
    exact_duplicates,
    near_duplicates,
)
from covidxr.data.mapping import is_frontal
from covidxr.data.split import apply_split
from covidxr.errors import DatasetError, ImageReadError
from covidxr.files import file_digest
from covidxr.images.reader import MAX_PIXELS, Xray, load_xray

TINY_SIDE = 256
"""Images whose shorter side is below this many pixels are flagged as tiny."""

DRAFT_SIDE = 128
"""JPEGs are decoded at reduced scale (PIL draft mode) to at least this side before hashing; speed only."""

SUSPICIOUS_KINDS = ("color", "tiny", "view", "modality", "unreadable")
CLINICAL_MODALITIES = ("CR", "DX", "DR")


# --------------------------------------------------------------------------------------------- reading images


@dataclass
class ImageFacts:
    """What the audit needs to know about one image file."""

    digest: str = ""
    width: int = 0
    height: int = 0
    color: bool = False
    format: str = ""
    view_position: str = ""
    modality: str = ""
    hash: str = ""
    error: str = ""


def _read_reduced(path: str) -> tuple[Xray, int, int]:
    """Read ``path`` with load_xray, JPEGs first decoded at reduced scale (PIL draft mode) for speed; return the
    image and the original width and height."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.size[0] * im.size[1] <= MAX_PIXELS:
                width, height = im.size
                exif = im.info.get("exif")
                im.draft(im.mode, (DRAFT_SIDE, DRAFT_SIDE))
                im.load()
                buffer = io.BytesIO()
                im.save(buffer, "PNG", compress_level=1, **({"exif": exif} if exif else {}))
                return load_xray(buffer.getvalue(), name=os.path.basename(path)), width, height
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        pass  # not a JPEG PIL can draft: the shared reader decides (and names the problem)
    xray = load_xray(path)
    height, width = xray.pixels.shape
    return xray, width, height


def inspect_image(path: str) -> ImageFacts:
    """Return the :class:`ImageFacts` of one file; read failures are recorded in ``error``, never raised."""
    facts = ImageFacts()
    try:
        facts.digest = file_digest(path)
        xray, facts.width, facts.height = _read_reduced(path)
    except ImageReadError as exc:
        facts.error = str(exc)
        return facts
    except OSError as exc:
        facts.error = f"{os.path.basename(path)}: {exc.strerror or exc}"
        return facts
    facts.color = bool(xray.color)
    facts.format = xray.format
    facts.view_position = xray.header.get("ViewPosition", "")
    facts.modality = xray.header.get("Modality", "")
    facts.hash = np.packbits(dhash(xray.pixels)).tobytes().hex()
    return facts


def inspect_images(paths: Sequence[str], workers: int = 2, progress: bool = False) -> pd.DataFrame:
    """Inspect many files (in ``workers`` threads) and return one row of :class:`ImageFacts` per path."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        facts = list(tqdm(pool.map(inspect_image, paths), total=len(paths), desc="audit", disable=not progress))
    return pd.DataFrame([asdict(f) for f in facts], columns=list(ImageFacts.__dataclass_fields__))


# ------------------------------------------------------------------------------------------------- findings


def _view_problem(view: str) -> str:
    """Return a reason when a view position is not a frontal PA/AP radiograph, else ``""``."""
    view = str(view or "").strip()
    if not view or is_frontal(view):
        return ""
    lateral = view.casefold() in ("l", "ll", "rl", "lat", "lateral") or view.casefold().startswith("lat")
    return f"lateral view ({view})" if lateral else f"not a frontal view ({view})"


def suspicious_images(table: pd.DataFrame, facts: pd.DataFrame, tiny_side: int = TINY_SIDE
                      ) -> dict[str, list[dict[str, str]]]:
    """Return images that look wrong for the task, by kind: colour, tiny, view, modality, unreadable."""
    views = table["view"] if "view" in table.columns else pd.Series("", index=table.index)
    found: dict[str, list[dict[str, str]]] = {k: [] for k in SUSPICIOUS_KINDS}
    records = describe_rows(table)
    for i, (fact, view) in enumerate(zip(facts.itertuples(index=False), views, strict=True)):
        reasons = {
            "unreadable": fact.error,
            "color": "colour image" if fact.color else "",
            "tiny": (f"{fact.width}x{fact.height} px" if not fact.error and min(fact.width, fact.height) < tiny_side
                     else ""),
            "view": _view_problem(view) or _view_problem(fact.view_position),
            "modality": (f"DICOM modality {fact.modality}" if fact.modality and fact.modality.upper()
                         not in CLINICAL_MODALITIES else ""),
        }
        for kind, reason in reasons.items():
            if reason:
                found[kind].append({**records[i], "reason": reason})
    return found


def patient_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Return patients per class, images per patient (max, mean) and patient-id caveats."""
    per_patient = table.groupby("patient_id").size()
    labels_per_patient = table.groupby("patient_id")["label"].nunique()
    per_image = table["patient_id"].astype(str).str.startswith("image:")
    if "patient_id_kind" in table.columns:
        per_image |= table["patient_id_kind"].astype(str) == "image"
    return {
        "n_patients": int(per_patient.size),
        "per_class": {str(k): int(v) for k, v in table.groupby("label")["patient_id"].nunique().items()},
        "images_per_patient_max": int(per_patient.max()) if len(per_patient) else 0,
        "images_per_patient_mean": round(float(per_patient.mean()), 3) if len(per_patient) else 0.0,
        "patients_in_several_classes": sorted(labels_per_patient.index[labels_per_patient > 1].astype(str)),
        "images_without_patient_id": int(per_image.sum()),
    }


def count_tables(table: pd.DataFrame) -> dict[str, Any]:
    """Return image counts by class, by source, class x source and (when present) class x split."""
    sources = source_column(table)
    cross = pd.crosstab(table["label"], sources)
    out: dict[str, Any] = {
        "by_class": {str(k): int(v) for k, v in table["label"].value_counts().sort_index().items()},
        "by_source": {str(k): int(v) for k, v in sources.value_counts().sort_index().items()},
        "class_by_source": {str(c): {str(s): int(n) for s, n in row.items()} for c, row in cross.iterrows()},
    }
    if "split" in table.columns:
        by_split = pd.crosstab(table["label"], table["split"])
        out["class_by_split"] = {str(c): {str(s): int(n) for s, n in row.items()} for c, row in by_split.iterrows()}
    return out


# ------------------------------------------------------------------------------------------------------- audit


def audit(table: pd.DataFrame, split: pd.DataFrame | str | os.PathLike | None = None, *,
          probe: str | os.PathLike | None = None, near_bits: int = NEAR_DUPLICATE_BITS,
          tiny_side: int = TINY_SIDE, workers: int = 2, progress: bool = False,
          cache_dir: Path | None = None) -> dict[str, Any]:
    """Audit a dataset table (see the module docstring) and return the findings as a JSON-ready dict.

    Args:
        table: output of :func:`covidxr.data.manifest.load_manifest`.
        split: a saved split (``split.csv`` path or table with ``relpath``, ``split``); without it, a ``split``
            column already in ``table`` (official splits) is used when present.
        probe: a checkpoint path for :func:`~covidxr.data.source_probe.source_probe`, or None to skip it.
        near_bits: near-duplicate threshold in bits of the 256-bit dHash.
        tiny_side: shorter-side limit in pixels below which an image is flagged as tiny.
        workers: threads reading images.
        progress: show a progress bar.
        cache_dir: decode cache for the probe's features (None: decode without storing).

    Returns:
        Keys ``n_images``, ``classes``, ``sources``, ``counts``, ``patients``, ``exact_duplicates``,
        ``near_duplicates`` (each ``{"summary", "groups"|"pairs"}``), ``suspicious``, ``confounding``,
        ``notes``, ``settings`` and ``probe`` (None unless asked for).

    Raises:
        DatasetError: the table is empty, or the split does not match it.
        CheckpointError: the probe checkpoint cannot be used.
    """
    if split is not None:
        table = apply_split(table, split if isinstance(split, pd.DataFrame) else Path(split))
    table = table.reset_index(drop=True)
    if table.empty:
        raise DatasetError("no images to audit")
    if "relpath" not in table.columns:
        table = table.assign(relpath=table["path"])
    facts = inspect_images(table["path"].tolist(), workers=workers, progress=progress)
    exact = exact_duplicates(table, facts)
    near = near_duplicates(table, facts, near_bits)
    patients = patient_summary(table)
    notes = []
    if patients["images_without_patient_id"]:
        notes.append(f"{patients['images_without_patient_id']} image(s) have no real patient id (each counts as its "
                     "own patient): patient counts are upper bounds and one patient may sit in two splits")
    return {
        "n_images": int(len(table)),
        "classes": sorted(str(c) for c in table["label"].unique()),
        "sources": sorted(source_column(table).unique().tolist()),
        "counts": count_tables(table),
        "patients": patients,
        "exact_duplicates": {"summary": duplicate_summary(exact), "groups": exact},
        "near_duplicates": {"summary": duplicate_summary(near), "pairs": near},
        "suspicious": suspicious_images(table, facts, tiny_side),
        "confounding": confounding_warnings(table),
        "notes": notes,
        "settings": {"confounding_share": CONFOUNDING_SHARE, "tiny_side": tiny_side, "near_duplicate_bits": near_bits,
                     "hash": f"dHash {HASH_SIZE}x{HASH_SIZE} ({HASH_SIZE * HASH_SIZE} bits)"},
        "probe": _probe(table, probe, cache_dir) if probe is not None else None,
    }


def _probe(table: pd.DataFrame, checkpoint: str | os.PathLike, cache_dir: Path | None) -> dict[str, Any]:
    # Imported here: torch and scikit-learn take seconds to import, and only the probe needs them.
    from covidxr.data.source_probe import source_probe

    return source_probe(table, checkpoint, cache_dir=cache_dir)
