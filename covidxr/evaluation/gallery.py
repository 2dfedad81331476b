"""Failure gallery: per true class, the images the model got wrong with the most confidence (small thumbnails and
Grad-CAM overlays written into the evaluation folder), and the errors counted by source and by what the model said
instead."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.errors import ImageReadError, one_line
from covidxr.evaluation.film_pass import Film, FilmPass
from covidxr.explain.display import overlay
from covidxr.files import atomic_write_bytes

log = logging.getLogger("covidxr.evaluate")

PER_CLASS = 4  # errors shown per true class and set: keeps the Grad-CAM pass short on a CPU
THUMB_SIDE = 160
FOLDER = "gallery"


def confident_errors(probs: np.ndarray, y: np.ndarray, per_class: int = PER_CLASS) -> dict[int, list[int]]:
    """Row indices of the most confident wrong predictions, per true class, most confident first.

    Args:
        probs: ``(N, C)`` probabilities.
        y: ``(N,)`` true class indices.
        per_class: How many errors to keep per true class.

    Returns:
        ``{true class index: [row index, ...]}`` for every class (an empty list when it has no error); ties are
        broken by row order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    out = {}
    for k in range(probs.shape[1]):
        wrong = np.flatnonzero((y == k) & (predicted != k))
        order = np.argsort(-confidence[wrong], kind="stable")
        out[k] = [int(i) for i in wrong[order][:per_class]]
    return out


def error_groups(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """The errors of a predictions frame (``label``, ``predicted``, maybe ``source``) by source and by answer."""
    wrong = frame["label"] != frame["predicted"]
    by_answer = (frame[wrong].groupby(["label", "predicted"]).size().rename("errors").reset_index()
                 .rename(columns={"label": "true class", "predicted": "model said"}))
    groups: dict[str, list[dict[str, Any]]] = {"by_answer": by_answer.to_dict("records"), "by_source": []}
    if "source" in frame.columns:
        source = frame["source"].fillna("").astype(str).replace("", "(unknown)")
        table = pd.DataFrame({"source": source, "wrong": wrong}).groupby("source")["wrong"].agg(["size", "sum"])
        groups["by_source"] = [{"source": s, "images": int(r["size"]), "errors": int(r["sum"]),
                                "error_rate": float(r["sum"] / r["size"])} for s, r in table.iterrows()]
    return groups


def _jpeg(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def error_paths(frame: pd.DataFrame, classes: Sequence[str], per_class: int = PER_CLASS) -> list[str]:
    """The films the gallery of ``frame`` (a predictions frame) shows: its most confident errors per true class."""
    frame = frame.reset_index(drop=True)
    probs = frame[list(classes)].to_numpy(dtype=np.float64)
    y = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return [str(frame.iloc[i]["path"]) for rows in confident_errors(probs, y, per_class).values() for i in rows]


def _pictures(film: Film) -> tuple[bytes, bytes | None, float | None]:
    """Thumbnail, Grad-CAM overlay of the predicted class (None without a heatmap) and lung share of one film, from
    the evaluation's film pass (:func:`covidxr.evaluation.film_pass.gallery_films` explained it and kept its pixels).

    Raises:
        ValueError: the pass did not keep the film's pixels.
    """
    if film.pixels is None:
        raise ValueError("the film pass kept no pixels of this film")
    thumb = _jpeg(overlay(film.pixels, None, max_side=THUMB_SIDE))
    if film.heat is None:
        return thumb, None, None
    return thumb, _jpeg(overlay(film.pixels, film.heat, max_side=THUMB_SIDE)), film.lung_share


def gallery(sets: Sequence[tuple[str, pd.DataFrame]], classes: Sequence[str], out: Path,
            films: Mapping[str, FilmPass], per_class: int = PER_CLASS) -> list[dict[str, Any]]:
    """The failure gallery of each evaluated set, with its pictures written to ``out/gallery/``.

    Args:
        sets: ``(name, predictions frame)`` per set (columns ``path``, ``label``, ``predicted`` and one probability
            column per class).
        classes: The model's classes.
        out: The evaluation folder.
        films: Each set's film pass with its gallery's films (:func:`covidxr.evaluation.film_sets.with_gallery`):
            their pixels, heat maps and lung shares.
        per_class: Errors shown per true class and set.

    Returns:
        Per set ``{"name", "n_errors", "items": [...], "groups": error_groups}``; each item holds the image's
        ``relpath``, ``source``, ``label``, ``predicted``, ``probs``, ``thumbnail``/``gradcam`` (file names under
        ``out``, None when not made), ``lung_share`` and ``note``.
    """
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    results = []
    for name, frame in sets:
        frame = frame.reset_index(drop=True)
        probs = frame[list(classes)].to_numpy(dtype=np.float64)
        y = frame["label"].map(index).to_numpy()
        items = []
        for k, rows in confident_errors(probs, y, per_class).items():
            for rank, i in enumerate(rows):
                row = frame.iloc[i]
                item = {"true_class": classes[k], "rank": rank + 1, "relpath": str(row.get("relpath", row["path"])),
                        "source": str(row.get("source", "") or ""), "label": row["label"],
                        "predicted": row["predicted"], "probs": {c: float(row[c]) for c in classes},
                        "thumbnail": None, "gradcam": None, "lung_share": None, "note": None}
                stem = f"{FOLDER}/{name}-{classes[k]}-{rank + 1}"
                try:
                    film = films[name].films.get(str(row["path"])) if name in films else None
                    if film is None:
                        raise ImageReadError("unreadable film")
                    thumb, cam, share = _pictures(film)
                except (ImageReadError, OSError, ValueError) as exc:
                    item["note"] = f"no picture: {one_line(exc)}"
                    log.warning("gallery: %s: %s", row["path"], item["note"])
                else:
                    atomic_write_bytes(out / f"{stem}.jpg", thumb)
                    item["thumbnail"], item["lung_share"] = f"{stem}.jpg", share
                    if cam is not None:
                        atomic_write_bytes(out / f"{stem}-gradcam.jpg", cam)
                        item["gradcam"] = f"{stem}-gradcam.jpg"
                items.append(item)
        results.append({"name": name, "n_images": int(len(frame)),
                        "n_errors": int((frame["label"] != frame["predicted"]).sum()), "per_class": per_class,
                        "items": items, "groups": error_groups(frame)})
    return results
