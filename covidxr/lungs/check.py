"""A visual and numeric check of the lung model on films of every source: a contact sheet (each film with its mask
outline and lung box) and the share of films per source where :func:`lung_box` fell back to the whole image.

Sources are the ``source`` column of ``all.csv`` (ieee8023 fork, Kermany, NIH, Hannover) and the two classes of
``external/``. The films were never seen in training (the lung masks come from other films).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.ndimage
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from covidxr.errors import DatasetError
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.images.reader import load_xray
from covidxr.lungs.geometry import LungBox, lung_box
from covidxr.lungs.model import LungModel, load_lung_model

TILE = 200  # side of one film's square on the sheet, in pixels
LABEL_WIDTH = 150
SHORT_NAMES = {
    "hida6/covid-chestxray-dataset": "ieee8023 fork",
    "lecuong1502/BTL_Machine_Learning": "Kermany (paed.)",
    "NIH ChestX-ray8 (via muhammedtalo/COVID-19)": "NIH",
    "Hannover Medical School (ml-workgroup/covid-19-image-repository)": "Hannover",
}


@dataclass
class Film:
    """One checked film: where it came from, its mask and lung box."""

    source: str
    label: str
    path: Path
    image: np.ndarray
    mask: np.ndarray
    box: LungBox

    @property
    def lung_share(self) -> float:
        return float(self.mask.mean())


def default_data_root() -> Path:
    """``$COVIDXR_SHARED_DATA``, else ``shared/data`` beside the checkout."""
    env = os.environ.get("COVIDXR_SHARED_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def source_table(root: Path) -> pd.DataFrame:
    """Return ``path`` (absolute), ``source`` (short name) and ``label`` of every film in all.csv and external/.

    Raises:
        DatasetError: all.csv or external/metadata.csv is missing.
    """
    tables = []
    for manifest, prefix in ((root / "all.csv", None), (root / "external" / "metadata.csv", "external")):
        if not manifest.is_file():
            raise DatasetError(f"{manifest}: not found (pass --data-root, the folder holding all.csv and external/)")
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        table["path"] = [str(manifest.parent / p) for p in table["path"]]
        if prefix:
            table["source"] = [f"{prefix} {label}" for label in table["label"]]
        else:
            table["source"] = [SHORT_NAMES.get(s, s) for s in table["source"]]
        tables.append(table[["path", "source", "label"]])
    return pd.concat(tables, ignore_index=True)


def segment(model: LungModel, rows: pd.DataFrame, margin: float = 0.05) -> Iterator[Film]:
    """Read, mask and box each film of ``rows`` (in batches of 8), one at a time."""
    records = rows.to_dict("records")
    for start in tqdm(range(0, len(records), 8), desc="lung masks", leave=False, disable=None):
        batch = records[start : start + 8]
        images = [load_xray(r["path"]).pixels for r in batch]
        for record, image, mask in zip(batch, images, model.masks(images), strict=True):
            yield Film(record["source"], record["label"], Path(record["path"]), image, mask, lung_box(mask, margin))


def fallback_rates(films: Iterable[Film]) -> dict[str, dict[str, Any]]:
    """Per source: films, how many fell back, the rate, the median predicted lung share of the image, and the
    names of (up to ten) films that fell back."""
    outcomes: dict[str, list[tuple[str, bool, float]]] = {}
    for f in films:  # keep only the numbers: films can be 4000 px wide
        outcomes.setdefault(f.source, []).append((f.path.name, f.box.fell_back, f.lung_share))
    out: dict[str, dict[str, Any]] = {}
    for source, rows in outcomes.items():
        fell = [name for name, fell_back, _ in rows if fell_back]
        out[source] = {"films": len(rows), "fell_back": len(fell), "rate": round(len(fell) / len(rows), 3),
                       "median_lung_share": round(float(np.median([share for *_, share in rows])), 3),
                       "fell_back_films": fell[:10]}
    return out


def tile(film: Film) -> Image.Image:
    """The film fitted into a TILE x TILE square, mask outline in red, lung box in green (orange when it fell
    back), with its label and lung share."""
    height, width = film.image.shape
    scale = TILE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = Image.fromarray(np.uint8(film.image * 255)).resize(size, Image.BILINEAR)
    small = np.asarray(Image.fromarray(np.uint8(film.mask) * 255).resize(size, Image.NEAREST)) > 0
    outline = small & ~scipy.ndimage.binary_erosion(small, iterations=2)
    rgb = np.stack([np.asarray(grey)] * 3, axis=-1)
    rgb[outline] = (255, 40, 40)
    canvas = Image.new("RGB", (TILE, TILE), (30, 30, 30))
    left, top = (TILE - size[0]) // 2, (TILE - size[1]) // 2
    canvas.paste(Image.fromarray(rgb), (left, top))
    draw = ImageDraw.Draw(canvas)
    b = film.box
    colour = (255, 160, 0) if b.fell_back else (60, 220, 60)
    draw.rectangle([left + b.left * scale, top + b.top * scale, left + b.right * scale - 1,
                    top + b.bottom * scale - 1], outline=colour, width=2)
    caption = f"{film.label} {film.lung_share:.0%}" + (" FALLBACK" if b.fell_back else "")
    draw.rectangle([0, TILE - 14, TILE, TILE], fill=(0, 0, 0))
    draw.text((3, TILE - 13), caption, fill=(255, 255, 255), font=ImageFont.load_default())
    return canvas


def contact_sheet(films: list[Film], per_source: int) -> Image.Image:
    """One row per source (its name at the left), up to ``per_source`` tiles per row."""
    sources = list(dict.fromkeys(f.source for f in films))
    sheet = Image.new("RGB", (LABEL_WIDTH + per_source * TILE, len(sources) * TILE), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, source in enumerate(sources):
        draw.text((6, row * TILE + TILE // 2 - 6), source, fill=(255, 255, 255), font=ImageFont.load_default())
        for col, film in enumerate([f for f in films if f.source == source][:per_source]):
            sheet.paste(tile(film), (LABEL_WIDTH + col * TILE, row * TILE))
    return sheet


def pick(table: pd.DataFrame, per_source: int, seed: int) -> pd.DataFrame:
    """``per_source`` films drawn at random from each source, balanced over its labels where it has several."""
    rng = np.random.default_rng(seed)
    picked = []
    for _, group in table.groupby("source", sort=False):
        order = group.iloc[rng.permutation(len(group))]
        by_label = [g for _, g in order.groupby("label", sort=True)]
        interleaved = pd.concat([g.iloc[i : i + 1] for i in range(per_source) for g in by_label])
        picked.append(interleaved.head(per_source))
    return pd.concat(picked)


def check_sources(model_path: str | None, data_root: str | Path | None, out: Path, per_source: int = 6,
                  all_films: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write the contact sheet to ``out`` (PNG) and ``out`` with ``.json`` (fall-back rates); return the report.

    Args:
        model_path: lung checkpoint; None for the default location.
        data_root: folder with all.csv and external/; None for :func:`default_data_root`.
        out: PNG to write.
        per_source: films per source on the sheet.
        all_films: compute fall-back rates over every film (else over the sheet's films only).
        seed: which films go on the sheet.
    """
    model = load_lung_model(model_path)
    table = source_table(Path(data_root) if data_root else default_data_root())
    shown = pick(table, per_source, seed)
    films = list(segment(model, shown))
    sheet = contact_sheet(films, per_source)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    rated = segment(model, table) if all_films else films
    report = {"sheet": str(out), "rates_over": "all films" if all_films else "the sheet's films",
              "fallback": fallback_rates(rated)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    return report

