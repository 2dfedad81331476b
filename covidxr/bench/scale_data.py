"""A synthetic dataset of any size made from the real shared films, for ``python -m covidxr.bench scale``.

Every file is one of the shared radiographs (``all.csv``: ``cxr/`` and ``multisite/``), read once with the project's
reader, then re-encoded with its own small random crop, rescale, contrast and brightness change and noise, so that
no two files are byte-identical while all of them look like chest X-rays to every stage (decoders, hashes,
augmentation). Files keep the format of their film (JPEG, some PNG), at most ``max_side`` pixels on the long side.

Patients have one to three images (80 %, 13 %, 7 %), all variants of one film, with the film's class, source and
view; patient ids are new (``syn-<source>-<n>``), so one film gives several synthetic patients once the dataset is
larger than the 798 films. Those are near duplicates of one another, as copies across patients are in public
collections; the audit counts them.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.data.manifest import write_manifest
from covidxr.images.reader import load_xray

IMAGES_PER_PATIENT = ((1, 0.80), (2, 0.13), (3, 0.07))
CROP = 0.08  # at most this share of each side is cut off
RESCALE = (0.7, 1.0)
GAMMA = (0.8, 1.25)
CONTRAST = (0.85, 1.15)
BRIGHTNESS = (-12.0, 12.0)  # grey levels
NOISE = (1.5, 4.0)  # standard deviation in grey levels
JPEG_QUALITY = (85, 96)


@dataclass(frozen=True)
class Film:
    """One shared radiograph, decoded once: uint8 pixels and what the manifest says about it."""

    pixels: np.ndarray  # (H, W) uint8, long side <= max_side
    label: str
    source: str
    view: str
    png: bool


_FILMS: list[Film] = []  # set in the parent before the pool forks, so that workers share the decoded films


def load_films(root: Path, max_side: int, limit: int | None = None, seed: int = 0) -> list[Film]:
    """Decode the films of ``root/all.csv`` (at most ``limit``, drawn at random), shrunk to ``max_side``."""
    table = pd.read_csv(root / "all.csv", dtype=str, keep_default_na=False)
    if limit is not None and limit < len(table):
        table = table.iloc[np.sort(np.random.default_rng(seed).permutation(len(table))[:limit])]
    films = []
    for row in table.itertuples(index=False):
        image = Image.fromarray(np.round(load_xray(root / row.path).pixels * 255).astype(np.uint8))
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        films.append(Film(np.asarray(image), row.label, row.source, row.view, row.path.lower().endswith(".png")))
    return films


def _patient_films(n_images: int, n_films: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Return the film and the patient number of every image: patients of one to three images, one film each."""
    sizes, weights = zip(*IMAGES_PER_PATIENT, strict=True)
    counts = rng.choice(sizes, size=n_images, p=weights)
    films = np.resize(rng.permutation(n_films), len(counts))  # every film before any film twice
    per_image = np.repeat(films, counts)[:n_images]
    patient = np.repeat(np.arange(len(counts)), counts)[:n_images]
    return per_image.tolist(), patient.tolist()


def _source_tag(source: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", source.split("/")[0].split("(")[0].lower())[:12] or "unknown"


def variant(film: Film, rng: np.random.Generator) -> Image.Image:
    """Return a new image of ``film``: cropped a little, rescaled, with its own contrast, brightness and noise."""
    height, width = film.pixels.shape
    top, bottom, left, right = (rng.uniform(0, CROP, 4) * [height, height, width, width]).astype(int)
    crop = film.pixels[top : height - bottom, left : width - right]
    scale = rng.uniform(*RESCALE)
    size = (max(16, round(crop.shape[1] * scale)), max(16, round(crop.shape[0] * scale)))
    image = Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR)
    levels = np.arange(256) / 255.0
    curve = rng.uniform(*CONTRAST) * (levels ** rng.uniform(*GAMMA) - 0.5) + 0.5
    lut = np.clip(curve * 255 + rng.uniform(*BRIGHTNESS), 0, 255).astype(np.uint8)
    pixels = lut[np.asarray(image)]
    noise = rng.normal(0.0, rng.uniform(*NOISE), pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _write_one(job: tuple[int, int, int, str]) -> str:
    index, film_index, seed, out = job
    film = _FILMS[film_index]
    rng = np.random.default_rng([seed, index])
    image = variant(film, rng)
    path = Path(out) / film.label / f"{index:06d}{'.png' if film.png else '.jpg'}"
    if film.png:
        image.save(path, "PNG", compress_level=3)
    else:
        image.save(path, "JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
    return str(path)


def make_dataset(films: list[Film], n_images: int, out: Path, seed: int = 0, workers: int = 0) -> Path:
    """Write ``n_images`` synthetic files below ``out/images/<class>/`` and their manifest; return the manifest.

    Args:
        films: the decoded shared films (:func:`load_films`).
        n_images: how many files to write.
        out: an empty folder (under /tmp for the benchmark, never the repository).
        seed: makes the files and patients reproducible.
        workers: writing processes (0: in this process).
    """
    global _FILMS
    _FILMS = films
    rng = np.random.default_rng(seed)
    film_of, patient_of = _patient_films(n_images, len(films), rng)
    images = out / "images"
    for label in {f.label for f in films}:
        (images / label).mkdir(parents=True, exist_ok=True)
    jobs = [(i, f, seed, str(images)) for i, f in enumerate(film_of)]
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:  # fork: the workers inherit _FILMS
            paths = list(pool.map(_write_one, jobs, chunksize=64))
    else:
        paths = [_write_one(job) for job in jobs]
    rows = [{"path": path, "label": films[f].label, "source": films[f].source, "view": films[f].view,
             "patient_id": f"syn-{_source_tag(films[f].source)}-{p}"}
            for path, f, p in zip(paths, film_of, patient_of, strict=True)]
    return write_manifest(pd.DataFrame(rows, columns=["path", "label", "patient_id", "source", "view"]),
                          out / "manifest.csv")


def folder_mb(path: str | os.PathLike) -> float:
    """Return the size of the files below ``path`` (or of one file) in MB."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0
