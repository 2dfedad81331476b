"""Exact and near duplicates: identical file bytes, and images whose difference hashes (dHash) nearly agree.

A near duplicate is a pair of images whose 256-bit dHash (a 17x16 box-filtered grey thumbnail, :func:`dhash`)
differs in at most ``NEAR_DUPLICATE_BITS`` (12) bits. Re-encoded, rescaled or mildly brightness/contrast-adjusted
copies of an image fall within it; on the 402 shared images, no two different radiographs come closer than 19 bits
(different patients of one collection look alike at 8x8, which is why a 64-bit hash is not used). Crops and added
borders change the hash too much to be detected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def _words(hashes: np.ndarray) -> np.ndarray:
    """Pack ``(N, bits)`` booleans into ``(N, W)`` uint64 words (zero-padded) for popcount distances."""
    packed = np.packbits(hashes, axis=1)
    pad = (-packed.shape[1]) % 8
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)


def _same_key_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield every pair ``(a, b)``, ``a < b``, of rows with equal ``keys``, in blocks of at most N pairs.

    Rows are sorted by key; block ``d`` pairs each sorted position with the one ``d`` places further on, for as long
    as both still have the same key. The work is the number of pairs plus N log N, never N squared unless the pairs
    are that many.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    ends = np.flatnonzero(np.diff(ordered)) + 1
    sizes = np.diff(np.concatenate(([0], ends, [len(keys)])))
    start = np.flatnonzero(np.repeat(sizes, sizes) > 1)  # positions whose key is shared
    step = 1
    while start.size:
        start = start[start + step < len(keys)]
        start = start[ordered[start] == ordered[start + step]]
        if start.size:
            a, b = order[start], order[start + step]
            yield np.minimum(a, b), np.maximum(a, b)
        step += 1


def _chunk_keys(hashes: np.ndarray, max_distance: int) -> Iterator[np.ndarray]:
    """Yield, for each of ``max_distance + 1`` disjoint bit chunks, one integer key per row (equal chunk, equal key)."""
    n, bits = hashes.shape
    if max_distance >= bits:  # every pair is within reach: one chunk that all rows share
        yield np.zeros(n, dtype=np.int64)
        return
    edges = [i * bits // (max_distance + 1) for i in range(max_distance + 2)]  # every chunk at least one bit wide
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        yield np.unique(np.packbits(hashes[:, lo:hi], axis=1), axis=0, return_inverse=True)[1].reshape(-1)


def close_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """Return ``(i, j, distance)`` for all pairs ``i < j`` whose boolean hashes differ in ``<= max_distance`` bits.

    Multi-index hashing (Norouzi et al., CVPR 2012): the bits are cut into ``max_distance + 1`` disjoint chunks, and
    two hashes within ``max_distance`` bits agree exactly on at least one chunk (pigeonhole). Only pairs that share a
    chunk are compared, so N images cost about N log N plus the candidate pairs instead of N squared comparisons;
    the result is exactly the all-pairs one.

    Args:
        hashes: ``(N, bits)`` boolean array.
        max_distance: Hamming distance threshold in bits.

    Returns:
        The pairs, sorted by distance, then ``i``, then ``j``.
    """
    hashes = np.asarray(hashes, dtype=bool)
    if len(hashes) < 2 or max_distance < 0:
        return []
    words = _words(hashes)
    found: list[np.ndarray] = []
    for keys in _chunk_keys(hashes, max_distance):
        for a, b in _same_key_pairs(keys):
            distance = np.bitwise_count(words[a] ^ words[b]).sum(axis=1, dtype=np.int64)
            near = distance <= max_distance
            found.append(np.stack([a[near], b[near], distance[near]], axis=1))
    if not found:
        return []
    # A pair that agrees on several chunks was found once per chunk: keep one row per pair.
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0], pairs[:, 2]))]
    return [(int(i), int(j), int(d)) for i, j, d in pairs]


def describe_rows(table: pd.DataFrame, index: Sequence[int] | None = None) -> list[dict[str, str]]:
    """Return the identifying columns (relpath, label, source, patient id, split) of some rows (default: all) as
    plain dicts."""
    columns = [c for c in DESCRIBED_COLUMNS if c in table.columns]
    rows = table if index is None else table.iloc[list(index)]
    return rows[columns].astype(str).to_dict("records")


def _entry(images: list[dict[str, str]], **head: Any) -> dict[str, Any]:
    """A duplicate set: ``head`` (distance or digest), its images, and whether they span splits, sources, classes or
    patients."""
    crossing = {f"cross_{key}": len({img[key] for img in images if key in img}) > 1 for key in CROSS_KEYS}
    return {**head, "images": images, **crossing}


def exact_duplicates(table: pd.DataFrame, facts: pd.DataFrame) -> list[dict[str, Any]]:
    """Return one entry per set of byte-identical files (``digest``, ``images``, ``cross_*`` flags)."""
    digests = facts["digest"].where(facts["digest"] != "").dropna()
    groups = [g for _, g in digests.groupby(digests) if len(g) > 1]
    return [_entry(describe_rows(table, group.index), digest=group.iloc[0]) for group in groups]


def near_duplicates(table: pd.DataFrame, facts: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS
                    ) -> list[dict[str, Any]]:
    """Return pairs of different files whose dHashes (``facts["hash"]``) differ in at most ``max_distance`` bits."""
    ok = np.flatnonzero((facts["hash"] != "").to_numpy())
    if len(ok) < 2:
        return []
    bits = np.stack([hash_bits(h) for h in facts["hash"].iloc[ok]])
    digests = facts["digest"].to_numpy()
    records = describe_rows(table)
    out = []
    for i, j, distance in close_pairs(bits, max_distance):
        a, b = ok[i], ok[j]
        if digests[a] != digests[b]:  # byte-identical files are exact duplicates, reported there
            out.append(_entry([records[a], records[b]], distance=distance))
    return out


def duplicate_summary(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Return how many duplicate entries there are, and how many span splits, sources, classes and patients."""
    return {"total": len(entries), **{f"cross_{k}": sum(bool(e[f"cross_{k}"]) for e in entries) for k in CROSS_KEYS}}
