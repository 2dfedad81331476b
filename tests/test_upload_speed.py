"""The faster upload path gives the same numbers as the slower one it replaced (issue 30: upload to headline).

Histogram equalisation in numpy equals torchvision's to the bit; 8-bit films decode to the same floats through a
table; the pixels' SHA-256 reads the buffer without copying it; an overlay drawn from arrays shrunk once equals the
one drawn from the full-size arrays; a lung mask asked for at a smaller size is the full-size mask's network output
stopped at that size.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from covidxr.explain.display import overlay, shrink
from covidxr.images.reader import load_xray
from covidxr.inference.prediction_log import pixel_sha256
from covidxr.preprocessing.transforms import equalize


def _torchvision_hist(image: np.ndarray) -> np.ndarray:
    grey = np.clip(np.round(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return TF.equalize(torch.from_numpy(grey)[None])[0].numpy().astype(np.float32) / 255.0


@pytest.mark.parametrize("make", [
    lambda rng: rng.random((97, 131), dtype=np.float32),
    lambda rng: rng.beta(2, 5, (300, 200)).astype(np.float32),  # skewed, as films are
    lambda rng: np.round(rng.random((64, 64)) * 3).astype(np.float32) / 3,  # four grey levels
    lambda rng: np.full((40, 50), 0.4, dtype=np.float32),  # one level: torchvision leaves it as it is
    lambda rng: np.where(rng.random((80, 80)) < 0.999, 0.0, 1.0).astype(np.float32),  # too few non-max pixels
    lambda rng: rng.random((1, 5000), dtype=np.float32),  # the inside of a lung mask, as one row
])
def test_histogram_equalisation_equals_torchvision(make) -> None:
    image = make(np.random.default_rng(0))
    assert np.array_equal(equalize(image, "hist"), _torchvision_hist(image))


def test_clahe_reads_and_returns_the_same_eight_bits() -> None:
    import cv2

    from covidxr.preprocessing.transforms import CLAHE_CLIP, CLAHE_TILES

    image = np.random.default_rng(4).beta(2, 5, (300, 200)).astype(np.float32)
    grey = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(grey).astype(np.float32) / 255.0
    assert np.array_equal(equalize(image, "clahe"), expected)


@pytest.mark.parametrize("mode", ["L", "1", "I;16"])
def test_grey_films_decode_to_the_same_floats(mode: str) -> None:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        values = rng.integers(0, 65536, (60, 70), dtype=np.uint16)
        picture, expected = Image.fromarray(values), values.astype(np.float32) / 65535.0
    else:
        values = rng.integers(0, 256, (60, 70), dtype=np.uint8)
        picture = Image.fromarray(values).convert(mode)
        expected = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    pixels = load_xray(buffer.getvalue(), name="film.png").pixels
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert np.array_equal(pixels, expected)


def test_pixel_digest_is_the_digest_of_the_float32_bytes() -> None:
    pixels = np.random.default_rng(2).random((33, 45), dtype=np.float32)
    assert pixel_sha256(pixels) == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert pixel_sha256(pixels[:, ::2]) == hashlib.sha256(np.ascontiguousarray(pixels[:, ::2]).tobytes()).hexdigest()
    assert pixel_sha256(pixels.astype(np.float64)) == pixel_sha256(pixels)


def test_an_overlay_of_shrunk_arrays_is_the_overlay_of_the_full_ones() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((1500, 1100), dtype=np.float32)
    heat = rng.random((1500, 1100), dtype=np.float32)
    small_image, small_heat = shrink(image, 512), shrink(heat, 512)
    assert small_image.shape == small_heat.shape == (512, 375)
    assert np.array_equal(overlay(small_image, small_heat, alpha=0.6, max_side=512),
                          overlay(image, heat, alpha=0.6, max_side=512))
    assert np.array_equal(overlay(small_image, None, max_side=512), overlay(image, None, max_side=512))


def test_a_lung_mask_at_a_smaller_size_is_the_same_network_output() -> None:
    from covidxr.lungs.model import LungModel

    class Bright(torch.nn.Module):  # "lung" where the letterboxed input is bright: a logit of (x - 0.5) * 20
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 0.5) * self.scale

    model = LungModel(Bright(), img_size=64)
    image = np.zeros((400, 300), dtype=np.float32)
    image[80:320, 40:130] = image[80:320, 170:260] = 1.0
    full, small = model.mask(image), model.mask(image, shape=(100, 75))
    assert full.shape == (400, 300) and small.shape == (100, 75)
    assert abs(full.mean() - small.mean()) < 0.02
    assert np.array_equal(model.masks([image, image], shapes=[(100, 75), None])[0], small)
