"""Train/val/test splits grouped by patient (and by identical file content), stratified by class."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covidxr.errors import DatasetError
from covidxr.files import file_digest

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("relpath", "label", "patient_id", "source", "view", "split")
DIGEST_THREADS = 4


def leakage_groups(patient_ids: Sequence[str], digests: Sequence[str]) -> np.ndarray:
    """Return one group number per image: images sharing a patient id or identical bytes share a group."""
    parent = list(range(len(patient_ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in (patient_ids, digests):
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    roots = [find(i) for i in range(len(parent))]
    _, groups = np.unique(roots, return_inverse=True)
    return groups


def assign_splits(
    labels: Sequence[str],
    groups: Sequence[int],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
    forced_test: Iterable[int] = (),
) -> np.ndarray:
    """Return a split name per image so that each group lands in exactly one split.

    Groups are stratified by their majority class: within each class, shuffled groups fill test, then val,
    up to the requested fraction of that class's images; the rest is train. Groups in ``forced_test``
    (held-out sources) go to test whatever the fractions say.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    frame = pd.DataFrame({"label": list(labels), "group": np.asarray(groups)})
    forced = set(forced_test)
    rng = np.random.default_rng(seed)
    majority = _majority_labels(frame)
    sizes = frame.groupby("group").size().to_dict()
    split_of = dict.fromkeys(forced, "test")
    for label in sorted(majority.unique()):
        members = sorted(g for g in majority.index[majority == label] if g not in forced)
        members = [members[i] for i in rng.permutation(len(members))]
        total = sum(sizes[g] for g in members)
        targets = {"test": fractions[2] * total, "val": fractions[1] * total}
        filled = {"test": 0, "val": 0}
        for g in members:
            split = next((s for s in ("test", "val") if filled[s] + sizes[g] / 2 <= targets[s]), "train")
            if split != "train":
                filled[split] += sizes[g]
            split_of[g] = split
    return frame["group"].map(split_of).to_numpy(dtype=object)


def _majority_labels(frame: pd.DataFrame) -> pd.Series:
    """The most frequent label of each group (``value_counts`` order on ties); one pass for single-label groups."""
    by_group = frame.groupby("group")["label"]
    majority = by_group.first()
    mixed = by_group.nunique()
    mixed = mixed.index[mixed > 1]
    if len(mixed):
        several = frame[frame["group"].isin(mixed)].groupby("group")["label"]
        majority[mixed] = several.agg(lambda s: s.value_counts().index[0])
    return majority


def make_split(
    df: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
    holdout_sources: Sequence[str] = (),
) -> pd.DataFrame:
    """Return ``df`` with a ``split`` column: no patient and no byte-identical image in two splits.

    A ``split`` column already present in the manifest is kept as given (official splits), after a check
    that it does not leak patients.
    """
    df = df.copy()
    with ThreadPoolExecutor(max_workers=DIGEST_THREADS) as pool:  # hashlib and file reads release the GIL
        digests = list(pool.map(file_digest, df["path"]))
    groups = leakage_groups(df["patient_id"].tolist(), digests)
    if "split" in df.columns and (df["split"] != "").all():
        check_no_leakage(df.assign(group=groups))
        return df
    unknown = set(holdout_sources) - set(df["source"])
    if unknown:
        known = sorted(set(df["source"]))
        raise DatasetError(f"--holdout-source {', '.join(sorted(unknown))} not among sources {known}")
    forced = set(groups[df["source"].isin(holdout_sources).to_numpy()])
    df["split"] = assign_splits(df["label"].tolist(), groups, fractions, seed, forced)
    return df


def check_no_leakage(df: pd.DataFrame) -> None:
    """Raise if a patient (or a ``group`` column, when present) appears in more than one split."""
    for key in ("patient_id", "group"):
        if key in df.columns:
            spread = df.groupby(key)["split"].nunique()
            if (spread > 1).any():
                raise DatasetError(f"split leaks {key} {spread.index[spread > 1][0]!r} across splits")


def save_split(df: pd.DataFrame, path: Path) -> None:
    """Write the split table (``relpath`` keyed) as CSV, atomically."""
    from covidxr.files import atomic_write_bytes

    columns = [c for c in SPLIT_COLUMNS if c in df.columns]
    atomic_write_bytes(path, df[columns].to_csv(index=False).encode())


def saved_split(given: str | Path | None) -> Path | None:
    """The ``split.csv`` that ``--split-from`` names (a run folder or the file itself); None when not given.

    Raises:
        DatasetError: no split file there.
    """
    if not given:
        return None
    path = Path(given)
    path = path / "split.csv" if path.is_dir() else path
    if not path.is_file():
        raise DatasetError(f"--split-from {given}: no split.csv there (give a run folder or its split.csv)")
    return path


def apply_split(df: pd.DataFrame, split_csv: Path | pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with the ``split`` column taken from a saved split (matched on ``relpath``).

    Images not in the saved split are dropped; a saved image missing from ``df`` is an error.
    """
    saved = pd.read_csv(split_csv, dtype=str, keep_default_na=False) if isinstance(split_csv, Path) else split_csv
    mapping = dict(zip(saved["relpath"], saved["split"], strict=True))
    missing = set(mapping) - set(df["relpath"])
    if missing:
        example = sorted(missing)[0]
        raise DatasetError(f"{len(missing)} image(s) of the saved split are not in the dataset, e.g. {example}")
    df = df[df["relpath"].isin(mapping)].copy()
    df["split"] = df["relpath"].map(mapping)
    return df
