"""Dataset audit: what a dataset really contains before any model is trained on it.

:func:`audit` reads every image once (through :func:`covidxr.io.load_xray`) and reports:

* counts per class and per source (cross-table), per split when a split is given;
* patients per class and images per patient (max, mean); images whose patient id is per-image (the dataset had
  none, so a patient may hide in two splits);
* exact duplicates: identical file bytes (SHA-256, :func:`covidxr.files.file_digest`);
* near duplicates: a 256-bit difference hash (dHash on a 17x16 box-filtered grey thumbnail, see :func:`dhash`)
  within ``NEAR_DUPLICATE_BITS`` (12) bits. Re-encoded, rescaled or mildly brightness/contrast-adjusted copies of
  an image fall within it; on the 402 shared images, no two different radiographs come closer than 19 bits
  (different patients of one collection look alike at 8x8, which is why a 64-bit hash is not used). Crops and
  added borders change the hash too much to be detected;
* images that look wrong for the task: colour images (:attr:`covidxr.io.Xray.color`), tiny images (shorter side
  below ``TINY_SIDE`` = 256 px), non-frontal views (from the ``view`` column or the DICOM ViewPosition) and
  DICOM modalities other than CR/DX;
* confounding (:func:`confounding_warnings`): a class that comes for ``CONFOUNDING_SHARE`` (80 %) or more from
  one source, or a source that contributes a single class. A network can then learn the source (hospital,
  scanner, age group, image processing) instead of the disease;
* optionally (:func:`source_probe`), how well a linear probe on a checkpoint's pooled backbone features predicts
  the source of an image, overall and within each class that has several sources. A within-class ROC-AUC well
  above 0.5 means the features carry a site signature that the classifier can use as a shortcut.

:func:`write_report` renders the result as Markdown or HTML (plus ``audit.json``), written atomically.
"""

from __future__ import annotations

import html
import io
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxr.data.sources import is_frontal
from covidxr.data.split import apply_split
from covidxr.errors import DatasetError, ImageReadError
from covidxr.files import atomic_write_text, file_digest
from covidxr.io import MAX_PIXELS, Xray, load_xray

CONFOUNDING_SHARE = 0.8
"""A class is confounded with a source when at least this share of its images comes from that source."""

TINY_SIDE = 256
"""Images whose shorter side is below this many pixels are flagged as tiny."""

HASH_SIZE = 16
"""dHash grid side: ``HASH_SIZE**2`` = 256 bits."""

NEAR_DUPLICATE_BITS = 12
"""Two images are near duplicates when their dHashes differ in at most this many of the 256 bits."""

DRAFT_SIDE = 128
"""JPEGs are decoded at reduced scale (PIL draft mode) to at least this side before hashing; speed only."""

REPORT_ROWS = 50
"""At most this many rows of each list are shown in the rendered report (all are in ``audit.json``)."""

UNKNOWN = "(unknown)"
SUSPICIOUS_TITLES = {"color": "Colour images", "tiny": "Tiny images", "view": "Not a frontal (PA/AP) view",
                     "modality": "DICOM modality other than CR/DX", "unreadable": "Unreadable files"}
CLINICAL_MODALITIES = ("CR", "DX", "DR")


# ------------------------------------------------------------------------------------------------- confounding


def _sources(table: pd.DataFrame) -> pd.Series:
    """Return the ``source`` column with blanks shown as ``(unknown)``."""
    column = table["source"] if "source" in table.columns else pd.Series("", index=table.index)
    return column.fillna("").astype(str).str.strip().replace("", UNKNOWN)


def confounding_warnings(table: pd.DataFrame, share: float = CONFOUNDING_SHARE) -> list[str]:
    """Return one warning per class/source confounding in ``table`` (labels and sources only; reads no image).

    Warns when a class comes for at least ``share`` of its images from one source, and when a source contributes
    images of a single class. Nothing is said when the whole table has one source (nothing to confound with), and
    one warning is given when no source is known at all.

    Args:
        table: a manifest table with ``label`` and (optionally) ``source`` columns.
        share: the dominance threshold (default ``CONFOUNDING_SHARE``, 0.8).

    Returns:
        Human-readable warnings, empty when nothing was found.
    """
    if table.empty:
        return []
    sources = _sources(table)
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


# ----------------------------------------------------------------------------------------------------- hashing


def dhash(pixels: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """Return the difference hash of a grey image as ``size * size`` booleans.

    The image is box-filtered to ``size`` rows by ``size + 1`` columns; each bit says whether a pixel is brighter
    than its left neighbour.

    Args:
        pixels: ``(H, W)`` float image.
        size: hash grid side.

    Returns:
        Boolean array of ``size * size`` bits.
    """
    from PIL import Image

    small = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
                       .resize((size + 1, size), Image.Resampling.BOX))
    return (small[:, 1:] > small[:, :-1]).ravel()


def close_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256) -> list[tuple[int, int, int]]:
    """Return ``(i, j, distance)`` for all pairs ``i < j`` whose boolean hashes differ in ``<= max_distance`` bits.

    Args:
        hashes: ``(N, bits)`` boolean array.
        max_distance: Hamming distance threshold.
        chunk: rows compared at a time (memory bound).

    Returns:
        The pairs, sorted by distance then index.
    """
    if len(hashes) < 2:
        return []
    packed = np.packbits(hashes.astype(bool), axis=1)
    pad = (-packed.shape[1]) % 8
    words = np.pad(packed, ((0, 0), (0, pad))).view(np.uint64)
    pairs = []
    for start in range(0, len(words), chunk):
        block = words[start : start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(dist <= max_distance)
        glob = rows + start
        keep = cols > glob
        pairs.extend(zip(glob[keep].tolist(), cols[keep].tolist(), dist[rows[keep], cols[keep]].tolist(),
                         strict=True))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


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
    """Read ``path`` with load_xray; JPEGs are first decoded at reduced scale (PIL draft mode) for speed.

    Returns:
        The image and the original width and height.
    """
    from PIL import Image, UnidentifiedImageError

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
    from tqdm.auto import tqdm

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        facts = list(tqdm(pool.map(inspect_image, paths), total=len(paths), desc="audit", disable=not progress))
    return pd.DataFrame([asdict(f) for f in facts], columns=list(ImageFacts.__dataclass_fields__))


def _hash_bits(hex_hash: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_hash), dtype=np.uint8)).astype(bool)


# ------------------------------------------------------------------------------------------------- findings


def _describe(table: pd.DataFrame, index: Sequence[int]) -> list[dict[str, str]]:
    """Return the identifying columns of some rows as plain dicts."""
    columns = [c for c in ("relpath", "label", "source", "patient_id", "split") if c in table.columns]
    return table.iloc[list(index)][columns].astype(str).to_dict("records")


def _crossing(images: list[dict[str, str]]) -> dict[str, bool]:
    """Say whether a set of images spans several splits, sources, classes or patients."""
    return {f"cross_{key}": len({img[key] for img in images if key in img}) > 1
            for key in ("split", "source", "label", "patient_id")}


def exact_duplicates(table: pd.DataFrame, facts: pd.DataFrame) -> list[dict[str, Any]]:
    """Return one entry per set of byte-identical files (``digest``, ``images``, ``cross_*`` flags)."""
    digests = facts["digest"].where(facts["digest"] != "")
    groups = [g for _, g in digests.dropna().groupby(digests.dropna()) if len(g) > 1]
    out = []
    for group in groups:
        images = _describe(table, group.index)
        out.append({"digest": group.iloc[0], "images": images, **_crossing(images)})
    return out


def near_duplicates(table: pd.DataFrame, facts: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS
                    ) -> list[dict[str, Any]]:
    """Return pairs of different files whose dHashes differ in at most ``max_distance`` bits."""
    ok = np.flatnonzero((facts["hash"] != "").to_numpy())
    if len(ok) < 2:
        return []
    bits = np.stack([_hash_bits(h) for h in facts["hash"].iloc[ok]])
    out = []
    for i, j, distance in close_pairs(bits, max_distance):
        a, b = ok[i], ok[j]
        if facts["digest"].iloc[a] == facts["digest"].iloc[b]:
            continue  # byte-identical: already an exact duplicate
        images = _describe(table, [a, b])
        out.append({"distance": int(distance), "images": images, **_crossing(images)})
    return out


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
    found: dict[str, list[dict[str, str]]] = {k: [] for k in ("color", "tiny", "view", "modality", "unreadable")}
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
                found[kind].append({**_describe(table, [i])[0], "reason": reason})
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
    sources = _sources(table)
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


def _duplicate_summary(entries: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("cross_split", "cross_source", "cross_label", "cross_patient_id")
    return {"total": len(entries), **{k: sum(bool(e[k]) for e in entries) for k in keys}}


# ------------------------------------------------------------------------------------------------------- probe


def _features(model: Any, paths: Sequence[str], img_size: int, cache_dir: Path | None, batch_size: int,
              workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Return pooled features of the readable images and a mask of which paths were readable."""
    import torch

    from covidxr.data.cache import prepare

    prepared = prepare(list(paths), img_size, cache_dir, workers=workers, desc="probe features")
    ok = np.array([img is not None for img in prepared.images], dtype=bool)
    squares = [img for img in prepared.images if img is not None]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(squares), batch_size):
            batch = torch.from_numpy(np.stack(squares[start : start + batch_size])).float().div(255.0)[:, None]
            chunks.append(model.features(batch).flatten(1).numpy())
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return feats, ok


def probe_auc(features: np.ndarray, sources: Sequence[str], groups: Sequence[str], folds: int = 5,
              seed: int = 0) -> dict[str, Any]:
    """Cross-validated ROC-AUC of a logistic-regression probe predicting ``sources`` from ``features``.

    Folds are grouped by patient (StratifiedGroupKFold). Sources with fewer than two patients are left out. The
    AUC is binary for two sources, else one-vs-rest macro-averaged; it is computed on out-of-fold probabilities.

    Returns:
        ``auc`` (None when it cannot be computed, with ``reason``), ``n_images``, ``folds`` and ``sources``
        (images per source used).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.DataFrame({"source": list(sources), "group": list(groups)})
    patients = frame.groupby("source")["group"].nunique()
    usable = patients.index[patients >= 2]
    keep = frame["source"].isin(usable).to_numpy()
    result: dict[str, Any] = {"auc": None, "n_images": int(keep.sum()), "folds": 0,
                              "sources": {str(k): int(v) for k, v in frame["source"][keep].value_counts().items()},
                              "left_out_sources": sorted(str(s) for s in patients.index if s not in set(usable))}
    if len(usable) < 2:
        result["reason"] = "fewer than two sources with at least two patients each"
        return result
    y, groups_kept, x = frame["source"][keep].to_numpy(), frame["group"][keep].to_numpy(), features[keep]
    k = int(min(folds, patients[usable].min()))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        proba = cross_val_predict(probe, x, y, groups=groups_kept, cv=cv, method="predict_proba")
    classes = np.unique(y)
    if len(classes) == 2:
        auc = roc_auc_score((y == classes[1]).astype(int), proba[:, 1])
    else:
        auc = roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    result.update(auc=round(float(auc), 4), folds=k)
    return result


def source_probe(table: pd.DataFrame, checkpoint: str | os.PathLike, folds: int = 5, seed: int = 0,
                 batch_size: int = 32, cache_dir: Path | None = None, workers: int = 0) -> dict[str, Any]:
    """Measure how well a checkpoint's backbone features predict the source of an image.

    Images are read with the shared reader, letterboxed to the checkpoint's ``preprocess.img_size`` (through the
    decode-once cache, as in training) and passed through the backbone; a linear probe is cross-validated, grouped
    by patient (:func:`probe_auc`), once over all images and once within each class that has at least two sources.

    Args:
        table: manifest table (``path``, ``label``, ``source``, ``patient_id``).
        checkpoint: a covidxr checkpoint.
        folds: at most this many cross-validation folds.
        seed: fold shuffling seed.
        batch_size: images per forward pass.
        cache_dir: decode cache folder (None: decode without storing).
        workers: decoding processes (0: in this process).

    Returns:
        ``overall`` and ``per_class`` probe results, plus ``checkpoint``, ``arch``, ``img_size``,
        ``n_features`` and ``unreadable`` (count).

    Raises:
        CheckpointError: the checkpoint cannot be loaded or does not fit its architecture.
    """
    import torch

    from covidxr.checkpoint import load_checkpoint
    from covidxr.models import model_from_checkpoint
    from covidxr.preprocess import Preprocess

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, str(checkpoint)).eval()
    img_size = Preprocess.from_dict(ckpt["preprocess"]).img_size
    with torch.inference_mode():
        feats, ok = _features(model, table["path"].tolist(), img_size, cache_dir, batch_size, workers)
    readable = table[ok].reset_index(drop=True)
    sources = _sources(readable)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "arch": ckpt["arch"], "img_size": int(img_size),
        "n_features": int(feats.shape[1]) if feats.size else 0, "unreadable": int((~ok).sum()),
        "overall": probe_auc(feats, sources, readable["patient_id"], folds, seed), "per_class": {},
    }
    for label in sorted(readable["label"].unique()):
        mask = (readable["label"] == label).to_numpy()
        if sources[mask].nunique() >= 2:
            result["per_class"][str(label)] = probe_auc(feats[mask], sources[mask], readable["patient_id"][mask],
                                                        folds, seed)
    return result


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
        probe: a checkpoint path for :func:`source_probe`, or None to skip it.
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
        "sources": sorted(_sources(table).unique().tolist()),
        "counts": count_tables(table),
        "patients": patients,
        "exact_duplicates": {"summary": _duplicate_summary(exact), "groups": exact},
        "near_duplicates": {"summary": _duplicate_summary(near), "pairs": near},
        "suspicious": suspicious_images(table, facts, tiny_side),
        "confounding": confounding_warnings(table),
        "notes": notes,
        "settings": {"confounding_share": CONFOUNDING_SHARE, "tiny_side": tiny_side, "near_duplicate_bits": near_bits,
                     "hash": f"dHash {HASH_SIZE}x{HASH_SIZE} ({HASH_SIZE * HASH_SIZE} bits)"},
        "probe": source_probe(table, probe, cache_dir=cache_dir) if probe is not None else None,
    }


# ------------------------------------------------------------------------------------------------------ report


Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"ul"|"table", content)


def _frame(rows: list[dict[str, Any]], limit: int = REPORT_ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows[:limit])


def _pairs_frame(entries: list[dict[str, Any]], limit: int = REPORT_ROWS) -> pd.DataFrame:
    """One row per duplicate set: its images side by side, plus what it spans."""
    rows = []
    for e in entries[:limit]:
        row = {"distance": e["distance"]} if "distance" in e else {"copies": len(e["images"])}
        row["images"] = "; ".join(f"{i['relpath']} ({i['label']}, {i['source']}"
                                  + (f", {i['split']})" if "split" in i else ")") for i in e["images"])
        row["spans"] = ", ".join(k.removeprefix("cross_") for k, v in e.items() if k.startswith("cross_") and v)
        rows.append(row)
    return pd.DataFrame(rows)


def _cross_frame(nested: dict[str, dict[str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(nested).T.fillna(0).astype(int)
    frame["total"] = frame.sum(axis=1)
    frame.loc["total"] = frame.sum(axis=0)
    return frame.reset_index(names="class")


def _probe_frame(probe: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for scope, r in [("all classes", probe["overall"]), *probe["per_class"].items()]:
        rows.append({"images of": scope, "ROC-AUC": "n/a" if r["auc"] is None else f"{r['auc']:.3f}",
                     "images": r["n_images"], "folds": r["folds"],
                     "sources": ", ".join(f"{k} {v}" for k, v in r["sources"].items()) or r.get("reason", "")})
    return pd.DataFrame(rows)


def report_blocks(result: dict[str, Any], title: str = "Dataset audit") -> list[Block]:
    """Lay out an :func:`audit` result as a list of headings, paragraphs, lists and tables."""
    s, p = result["settings"], result["patients"]
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"{result['n_images']} images, {p['n_patients']} patients, classes: {', '.join(result['classes'])}; "
              f"sources: {', '.join(result['sources'])}."),
        ("h2", "Confounding"),
        ("ul", result["confounding"] or ["no class comes mostly from one source, and no source gives one class only"]),
        ("p", f"A warning is given when at least {s['confounding_share']:.0%} of a class comes from one source, or "
              "when a source contributes a single class."),
        ("h2", "Counts (images per class and source)"),
        ("table", _cross_frame(result["counts"]["class_by_source"])),
    ]
    if "class_by_split" in result["counts"]:
        blocks += [("h2", "Counts per split"), ("table", _cross_frame(result["counts"]["class_by_split"]))]
    blocks += [
        ("h2", "Patients"),
        ("table", pd.DataFrame({"class": list(p["per_class"]), "patients": list(p["per_class"].values())})),
        ("p", f"Images per patient: max {p['images_per_patient_max']}, mean {p['images_per_patient_mean']:.2f}. "
              f"Patients with images in several classes: {len(p['patients_in_several_classes'])}."),
        ("ul", result["notes"]),
    ]
    for key, name, how in (("exact_duplicates", "Exact duplicates", "identical file bytes (SHA-1)"),
                           ("near_duplicates", "Near duplicates",
                            f"{s['hash']} within {s['near_duplicate_bits']} bits, byte-identical copies excluded")):
        entries = result[key]["groups" if key == "exact_duplicates" else "pairs"]
        summary = result[key]["summary"]
        blocks += [("h2", name),
                   ("p", f"{summary['total']} found ({how}); across splits {summary['cross_split']}, across sources "
                         f"{summary['cross_source']}, across classes {summary['cross_label']}, across patient ids "
                         f"{summary['cross_patient_id']}."),
                   ("table", _pairs_frame(entries))]
    blocks.append(("h2", "Images that look wrong for the task"))
    suspicious = result["suspicious"]
    blocks.append(("ul", [f"{SUSPICIOUS_TITLES.get(kind, kind)}: {len(rows)}" for kind, rows in suspicious.items()]))
    blocks.append(("p", f"Tiny means a shorter side below {s['tiny_side']} px."))
    for kind, rows in suspicious.items():
        if rows:
            blocks += [("h2", f"{SUSPICIOUS_TITLES.get(kind, kind)} ({len(rows)})"), ("table", _frame(rows))]
    if result.get("probe"):
        probe = result["probe"]
        blocks += [
            ("h2", "Source probe"),
            ("p", f"Linear probe (logistic regression) on the pooled {probe['arch']} features of "
                  f"{probe['checkpoint']} at {probe['img_size']} px, cross-validated by patient, predicting the "
                  "source. 0.5 is chance. A high AUC within one class means the features carry a site signature "
                  "that a classifier can use instead of the disease."),
            ("table", _probe_frame(probe)),
        ]
    return blocks


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    head = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def render_markdown(blocks: list[Block]) -> str:
    """Render report blocks as Markdown."""
    parts = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            parts.append(("# " if kind == "h1" else "## ") + content)
        elif kind == "p":
            parts.append(content)
        elif kind == "ul" and content:
            parts.append("\n".join(f"- {item}" for item in content))
        elif kind == "table":
            parts.append(_md_table(content))
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[Block]) -> str:
    """Render report blocks as a self-contained HTML page."""
    parts = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "ul" and content:
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in content) + "</ul>")
        elif kind == "table":
            parts.append("<p>(none)</p>" if content.empty else content.to_html(index=False, escape=True, border=0))
    title = html.escape(next((c for k, c in blocks if k == "h1"), "Dataset audit"))
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, fmt: str = "md",
                 title: str = "Dataset audit") -> Path:
    """Write ``audit.md`` or ``audit.html`` and ``audit.json`` into ``out_dir`` (atomically).

    Returns:
        The path of the rendered report.

    Raises:
        ValueError: ``fmt`` is not ``md`` or ``html``.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"report format must be md or html, not {fmt!r}")
    out_dir = Path(out_dir)
    blocks = report_blocks(result, title)
    report = out_dir / f"audit.{fmt}"
    atomic_write_text(out_dir / "audit.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(report, render_markdown(blocks) if fmt == "md" else render_html(blocks))
    return report
