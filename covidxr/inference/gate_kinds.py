"""Images that are not chest radiographs, made for the input gate's view check: photographs and documents.

The gate (:mod:`covidxr.inference.gate_fit`) learns these kinds as it learns rotated and inverted films: from images
made here, with a seed. A *photograph* is a scene of coloured shapes over a two-colour sky and ground, blurred and
noisy like a phone picture; a *document* is a page or a screenshot: dark lines of text on a light background, with a
title bar, ruled table cells and sometimes a dark header. Neither looks like any real photograph or document in
particular; what they share with them is what sets them apart from a radiograph (flat light areas, hard edges, text,
a scene lit from above). The evaluation (``--gate-variants``) makes another set with another seed to measure them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from covidxr.files import atomic_write_bytes

KINDS = ("photo", "document")
ASPECTS = (4 / 3, 3 / 4, 16 / 9, 1.0)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def photograph(rng: np.random.Generator) -> Image.Image:
    """One made-up colour photograph (RGB)."""
    width = int(rng.integers(320, 720))
    height = int(width / ASPECTS[rng.integers(len(ASPECTS))])
    horizon = int(height * rng.uniform(0.3, 0.7))
    top, bottom = np.array(_colour(rng, 90, 256)), np.array(_colour(rng, 0, 200))
    ramp = np.linspace(0, 1, height)[:, None, None]
    sky = top * (1 - ramp) + np.array(_colour(rng, 60, 256)) * ramp
    pixels = np.where(np.arange(height)[:, None, None] < horizon, sky, bottom * (0.6 + 0.4 * ramp))
    image = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 20))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        shape = (draw.ellipse, draw.rectangle, draw.rounded_rectangle)[rng.integers(3)]
        shape((x0, y0, x1, y1), fill=_colour(rng))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3.0))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def document(rng: np.random.Generator) -> Image.Image:
    """One made-up page or screenshot (greyscale)."""
    portrait = rng.random() < 0.5
    width = int(rng.integers(400, 800))
    height = int(width * (1.41 if portrait else 0.625))
    paper = int(rng.integers(225, 256))
    image = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    margin = int(width * rng.uniform(0.04, 0.12))
    y = margin
    if not portrait and rng.random() < 0.7:  # a screenshot's title bar
        bar = int(rng.integers(18, 40))
        draw.rectangle((0, 0, width, bar), fill=int(rng.integers(20, 120)))
        y = bar + margin // 2
    line = int(rng.integers(10, 22))
    ink = int(rng.integers(0, 90))
    while y < height - margin - line:
        if rng.random() < 0.12:  # a ruled table
            rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            cell_w = (width - 2 * margin) // cols
            for r in range(rows + 1):
                draw.line((margin, y + r * line * 1.5, width - margin, y + r * line * 1.5), fill=ink)
            for c in range(cols + 1):
                draw.line((margin + c * cell_w, y, margin + c * cell_w, y + rows * line * 1.5), fill=ink)
            y += int(rows * line * 1.5) + line
            continue
        x = margin
        end = width - margin - (int(rng.integers(0, width // 3)) if rng.random() < 0.3 else 0)
        while x < end:
            word = int(rng.integers(2, 10)) * max(3, line // 2)
            draw.rectangle((x, y + line // 4, min(x + word, end), y + line), fill=ink)  # a word, as a bar of ink
            x += word + max(4, line // 2)
        y += int(line * rng.uniform(1.4, 2.2))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(0, 4), (height, width))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


MAKERS = {"photo": photograph, "document": document}


def made_images(kind: str, n: int, seed: int) -> Iterator[Image.Image]:
    """``n`` images of ``kind`` (:data:`KINDS`), the same for the same seed."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    for _ in range(n):
        yield MAKERS[kind](rng)


def write_made_images(folder: Path, kind: str, n: int, seed: int, grey: bool = True) -> list[Path]:
    """Write ``n`` images of ``kind`` as PNG files into ``folder`` (photographs in greyscale unless ``grey`` is
    False: the file check refuses colour pictures already, the view check must know them without their colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(made_images(kind, n, seed)):
        path = folder / f"{kind}-{seed}-{i:04d}.png"
        buffer = io.BytesIO()
        (image.convert("L") if grey else image).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
