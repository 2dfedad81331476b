"""Exact and near duplicates: identical file bytes, and images whose difference hashes (dHash) nearly agree.

A near duplicate is a pair of images whose 256-bit dHash (a 17x16 box-filtered grey thumbnail, :func:`dhash`)
differs in at most ``NEAR_DUPLICATE_BITS`` (12) bits. Re-encoded, rescaled or mildly brightness/contrast-adjusted
copies of an image fall within it; on the 402 shared images, no two different radiographs come closer than 19 bits
(different patients of one collection look alike at 8x8, which is why a 64-bit hash is not used). Crops and added
borders change the hash too much to be detected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

HASH_SIZE = 16
"""dHash grid side: ``HASH_SIZE**2`` = 256 bits."""

NEAR_DUPLICATE_BITS = 12
"""Two images are near duplicates when their dHashes differ in at most this many of the 256 bits."""

CROSS_KEYS = ("split", "source", "label", "patient_id")
DESCRIBED_COLUMNS = ("relpath", "label", "source", "patient_id", "split")


def dhash(pixels: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """Return the difference hash of a grey image as ``size * size`` booleans.

    The image is box-filtered to ``size`` rows by ``size + 1`` columns; each bit says whether a pixel is brighter
    than its left neighbour.

    Args:
        pixels: ``(H, W)`` float image.
        size: hash grid side.
    """
    small = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
                       .resize((size + 1, size), Image.Resampling.BOX))
    return (small[:, 1:] > small[:, :-1]).ravel()


def hash_bits(hex_hash: str) -> np.ndarray:
    """Return the booleans of a hex-encoded hash (as stored in the audit's image facts)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_hash), dtype=np.uint8)).astype(bool)


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


def describe_rows(table: pd.DataFrame, index: Sequence[int]) -> list[dict[str, str]]:
    """Return the identifying columns (relpath, label, source, patient id, split) of some rows as plain dicts."""
    columns = [c for c in DESCRIBED_COLUMNS if c in table.columns]
    return table.iloc[list(index)][columns].astype(str).to_dict("records")


def _crossing(images: list[dict[str, str]]) -> dict[str, bool]:
    """Say whether a set of images spans several splits, sources, classes or patients."""
    return {f"cross_{key}": len({img[key] for img in images if key in img}) > 1 for key in CROSS_KEYS}


def exact_duplicates(table: pd.DataFrame, facts: pd.DataFrame) -> list[dict[str, Any]]:
    """Return one entry per set of byte-identical files (``digest``, ``images``, ``cross_*`` flags)."""
    digests = facts["digest"].where(facts["digest"] != "")
    groups = [g for _, g in digests.dropna().groupby(digests.dropna()) if len(g) > 1]
    out = []
    for group in groups:
        images = describe_rows(table, group.index)
        out.append({"digest": group.iloc[0], "images": images, **_crossing(images)})
    return out


def near_duplicates(table: pd.DataFrame, facts: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS
                    ) -> list[dict[str, Any]]:
    """Return pairs of different files whose dHashes (``facts["hash"]``) differ in at most ``max_distance`` bits."""
    ok = np.flatnonzero((facts["hash"] != "").to_numpy())
    if len(ok) < 2:
        return []
    bits = np.stack([hash_bits(h) for h in facts["hash"].iloc[ok]])
    out = []
    for i, j, distance in close_pairs(bits, max_distance):
        a, b = ok[i], ok[j]
        if facts["digest"].iloc[a] == facts["digest"].iloc[b]:
            continue  # byte-identical: already an exact duplicate
        images = describe_rows(table, [a, b])
        out.append({"distance": int(distance), "images": images, **_crossing(images)})
    return out


def duplicate_summary(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Return how many duplicate entries there are, and how many span splits, sources, classes and patients."""
    return {"total": len(entries), **{f"cross_{k}": sum(bool(e[f"cross_{k}"]) for e in entries) for k in CROSS_KEYS}}
