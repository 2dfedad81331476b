"""A run's data and its loaders: manifest filtering, the patient split, the prepared cache, samplers and batches.

Training and evaluation both load data through here; :class:`LoaderSettings` holds what this needs of a run's
configuration (``covidxr.training.config.TrainConfig.loader_settings`` makes one, and
:meth:`DataSettings.from_dict` reads one back from a stored config); the fields a run's configuration shares with
it are declared once, in :class:`DataSettings`, whose ``preprocessing`` is the run's
:class:`~covidxr.preprocessing.settings.InputSettings`. Under
``torchrun`` each rank loads its share: ``rank`` and ``world_size`` (a single process: 0 and 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from covidxr.data.cache import default_cache_dir, fill_cache
from covidxr.data.confounding import confounding_warnings
from covidxr.data.dataset import DeviceBatches, XrayDataset
from covidxr.data.manifest import class_names, dataset_root, load_manifest, resolve_data_path, validate_for_training
from covidxr.data.split import apply_split, check_no_leakage, make_split
from covidxr.errors import DatasetError
from covidxr.model.input_pipeline import InputPipeline, read_lung_entry
from covidxr.preprocessing.settings import InputSettings, flat_settings, settings_from_dict
from covidxr.preprocessing.style_augment import style_ranges
from covidxr.preprocessing.transforms import cache_size, eval_transform, train_transform

log = logging.getLogger("covidxr.data.loaders")
Settings = TypeVar("Settings", bound="DataSettings")

# Every rank augments differently: its seeds are the epoch's seed plus rank times this (rank 0: unchanged).
RANK_SEED_STRIDE = 1_000_003
# --gpu-cache auto keeps the prepared squares on the GPU up to this size and share of its free memory.
GPU_CACHE_MAX_BYTES = 4 << 30
GPU_CACHE_MAX_SHARE = 0.25


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """The settings of a run that decide its data and loaders: its input pipeline (``preprocessing``) and the
    fields below. ``covidxr.training.config.TrainConfig`` is data settings too."""

    preprocessing: InputSettings = field(default_factory=InputSettings)  # lung crop and mask, equalisation, ...
    data: str | None = None  # folder or manifest; else $COVIDXR_DATA, else data/cxr
    val_frac: float = 0.15
    test_frac: float = 0.15
    holdout_source: list[str] = field(default_factory=list)  # sources that go entirely to test
    balance: str = "loss"  # loss (weighted cross-entropy), sampler (by class), group (by class x source), sqrt, none
    # softmax: every film against every class; contrast: against its own source's classes (covidxr.training.contrast),
    # so films of a single-class source are never drawn
    loss: str = "softmax"
    epoch_size: int = 0  # films drawn per training epoch (with replacement, by the balance's weights); 0: the split
    exclude_source: list[str] = field(default_factory=list)  # sources left out entirely
    exclude_where: list[str] = field(default_factory=list)  # COLUMN=VALUE filters on manifest columns
    cache: bool = True  # decode each image once into the prepared cache
    cache_dir: str | None = None
    strict: bool = False  # unreadable images are fatal instead of skipped
    img_size: int = 224
    batch_size: int = 32
    workers: int = min(4, os.cpu_count() or 1)
    gpu_cache: str = "auto"  # keep the prepared squares on the GPU and augment there: auto | on | off
    seed: int = 0

    @classmethod
    def from_dict(cls: type[Settings], d: dict) -> Settings:
        """Build from the flat stored form (config.json, a checkpoint's ``config``), ignoring keys of other settings
        and of older or newer versions; missing keys take their defaults."""
        return settings_from_dict(cls, d)

    def to_dict(self) -> dict:
        """The flat stored form: one key per setting, the input settings' first (config.json's layout)."""
        return flat_settings(self)


@dataclass(frozen=True, kw_only=True)
class LoaderSettings(DataSettings):
    """Data settings, and the lung model itself when it comes from a checkpoint rather than a file."""

    lung_entry: dict | None = field(default=None, repr=False, compare=False)  # a checkpoint's "lung_model" entry


@dataclass
class RunData:
    """The dataset of a run after splitting and dropping unreadable files."""

    table: pd.DataFrame  # manifest rows with a split column
    classes: list[str]
    root: Path
    images: list[np.ndarray] | None  # prepared squares aligned with table rows, or None without the cache
    unreadable: dict[str, str]  # relpath -> reason
    pipeline: InputPipeline = field(default_factory=InputPipeline)  # how the squares were prepared


def input_pipeline(settings: LoaderSettings) -> InputPipeline:
    """The settings' lung crop, lung mask and equalisation, with the lung model from ``lung_entry`` or else its file.

    Raises:
        CheckpointError: a lung crop or mask without a lung model ("no lung model at PATH: run python -m
            covidxr.lungs train").
    """
    entry = settings.lung_entry
    pre = settings.preprocessing
    if pre.lung_crop and entry is None:
        entry = read_lung_entry(pre.lung_model)
    return InputPipeline(**pre.input_record(), lung_entry=entry)


def cache_dir(settings: LoaderSettings) -> Path | None:
    """The prepared cache folder, or None with ``--no-cache``."""
    if not settings.cache:
        return None
    return Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()


def prepare_rows(table: pd.DataFrame, settings: LoaderSettings, progress: bool = True,
                 pipeline: InputPipeline | None = None) -> tuple[pd.DataFrame, list[np.ndarray] | None, dict[str, str]]:
    """Decode (or read from the cache) every row's image; return the readable rows, their squares and the rest.

    ``pipeline`` (default: :func:`input_pipeline` of ``settings``) prepares each image.

    Returns:
        ``(readable rows re-indexed from 0, their prepared squares or None with --no-cache, relpath -> reason)``.
    """
    pipeline = input_pipeline(settings) if pipeline is None else pipeline
    prepared = fill_cache(table["path"].tolist(), cache_size(settings.img_size), cache_dir(settings),
                       workers=min(settings.workers, 8), desc="prepare images", progress=progress, pipeline=pipeline)
    unreadable = {table["relpath"].iloc[i]: reason for i, reason in prepared.failures.items()}
    keep = np.array([i not in prepared.failures for i in range(len(table))], dtype=bool)
    images = [img for img, ok in zip(prepared.images, keep, strict=True) if ok] if settings.cache else None
    return table[keep].reset_index(drop=True), images, unreadable


def load_run_data(settings: LoaderSettings, split: Path | pd.DataFrame | None = None) -> RunData:
    """Resolve, split and prepare the dataset; refuse unusable data early.

    ``split`` is a saved split (``split.csv`` or its table) to apply; None makes a new patient-level split.
    """
    data_path = resolve_data_path(settings.data)
    table = exclude_rows(load_manifest(data_path), settings.exclude_source, settings.exclude_where)
    validate_for_training(table, str(data_path))
    for warning in confounding_warnings(table):
        log.warning("confounding: %s", warning)
    if split is not None:
        table = apply_split(table, split)
    else:
        fractions = (1 - settings.val_frac - settings.test_frac, settings.val_frac, settings.test_frac)
        table = make_split(table, fractions, settings.seed, settings.holdout_source)
    check_no_leakage(table)
    classes = class_names(table)
    pipeline = input_pipeline(settings)
    table, images, unreadable = prepare_rows(table, settings, pipeline=pipeline)
    if unreadable and settings.strict:
        first = next(iter(unreadable.values()))
        raise DatasetError(f"{len(unreadable)} unreadable image(s) and --strict given, e.g. {first}")
    for name in ("train", "val"):
        if (table["split"] == name).sum() == 0:
            raise DatasetError(f"the {name} split is empty: the dataset is too small for the requested fractions")
    return RunData(table, classes, dataset_root(data_path), images, unreadable, pipeline)


def exclude_rows(table: pd.DataFrame, sources: list[str], where: list[str]) -> pd.DataFrame:
    """Drop the images of the named sources and those matching ``COLUMN=VALUE`` filters (logged, with counts)."""
    keep = ~table["source"].isin(sources)
    for rule in where:
        column, sep, value = rule.partition("=")
        if not sep or column not in table.columns:
            raise DatasetError(f"--exclude-where {rule!r}: expected COLUMN=VALUE with a manifest column "
                               f"({', '.join(table.columns)})")
        keep &= table[column].astype(str) != value
    if (~keep).any():
        log.info("left out %d image(s) by --exclude-source/--exclude-where", int((~keep).sum()))
    return table[keep].reset_index(drop=True)


def sample_weights(table: pd.DataFrame, balance: str, contrast: bool = False) -> np.ndarray:
    """Per-image sampling weights.

    ``sampler`` gives every class the same total weight, ``group`` every (class, source) group, ``sqrt`` every
    (class, source) group a total weight proportional to the square root of its size (a large collection still
    counts more than a small one, but no longer drowns it; a handful of films is not repeated hundreds of times),
    anything else every image the same. With ``contrast`` the images of a source holding a single class get weight 0:
    the source-contrast loss learns nothing from them.
    """
    if balance == "sampler":
        keys = table["label"]
    elif balance in ("group", "sqrt"):
        keys = table["label"] + "\x1f" + table["source"].astype(str)
    else:
        keys = pd.Series(0, index=table.index)
    sizes = keys.map(keys.value_counts()).to_numpy(dtype=np.float64)
    weights = 1.0 / np.sqrt(sizes) if balance == "sqrt" else 1.0 / sizes
    if contrast:
        classes_here = table.groupby(table["source"].astype(str))["label"].transform("nunique").to_numpy()
        weights = np.where(classes_here >= 2, weights, 0.0)
        if not weights.any():
            raise DatasetError("--loss contrast: no training source holds two classes (each source's films are "
                               "only compared with that source's other classes)")
    return weights


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, shared out over ranks.

    Every rank draws the same ``num_samples`` indices from one generator seeded with ``seed`` (the epoch's
    seed) -- the very draw ``WeightedRandomSampler`` makes in a single process with that generator -- and
    keeps every ``world_size``-th one from position ``rank``. So the ranks together see one weighted sample of
    the dataset per epoch, disjoint in positions, with the same class (or group) balance as a single process;
    the tail that does not divide evenly is dropped so that every rank takes the same number of steps.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, rank: int, world_size: int, seed: int) -> None:
        self.weights = torch.tensor(np.asarray(weights, dtype=np.float64))
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        yield from draw[self.rank : len(self) * self.world_size : self.world_size].tolist()


def split_sampler(sub: pd.DataFrame, train: bool, settings: LoaderSettings, epoch: int, epoch_seed: int,
                  rank: int = 0, world_size: int = 1) -> Sampler:
    """Return the order of one split's samples for one epoch (this rank's share under ``torchrun``).

    Training: shuffled, or drawn with replacement by ``--balance sampler/group/sqrt`` weights (also with
    ``--loss contrast`` or ``--epoch-size``, which draws that many films); seeded by the epoch
    (``DistributedSampler`` by ``--seed`` plus ``set_epoch``). Under ``torchrun`` the weighted draw is one
    global draw split over ranks (:class:`DistributedWeightedSampler`). Evaluation: in order; under ``torchrun``
    sharded with padding repeats, which :func:`covidxr.training.distributed.gather_epoch` drops again.
    """
    n = len(sub)
    contrast = settings.loss == "contrast"
    if train and (settings.balance in ("sampler", "group", "sqrt") or contrast or settings.epoch_size):
        weights = sample_weights(sub, settings.balance, contrast)
        n = settings.epoch_size or n
        if world_size > 1:
            return DistributedWeightedSampler(weights, n, rank, world_size, epoch_seed)
        return WeightedRandomSampler(weights.tolist(), n, replacement=True,
                                     generator=torch.Generator().manual_seed(epoch_seed))
    if world_size > 1:
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=train,
                                     seed=settings.seed, drop_last=train)
        sampler.set_epoch(epoch)
        return sampler
    if train:
        return RandomSampler(range(n), generator=torch.Generator().manual_seed(epoch_seed))
    return SequentialSampler(range(n))


def make_loaders(data: RunData, settings: LoaderSettings, device: torch.device, epoch_seed: int, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, device_images: torch.Tensor | None = None,
                 augment: bool = True) -> dict[str, Iterable]:
    """Return train/val/test loaders; the train loader's order and augmentations follow ``epoch_seed``.

    Args:
        device: where batches go (pinned host memory on CUDA).
        epoch: the epoch number (``DistributedSampler.set_epoch``).
        rank: this process's rank under ``torchrun``; each rank loads its share of ``world_size``.
        device_images: the prepared squares of every table row already on ``device`` (``--gpu-cache``): batches
            are then cut and augmented there (:class:`covidxr.data.dataset.DeviceBatches`) instead of by a
            ``DataLoader``.
        augment: False gives the train split the evaluation transform and order (feature extraction).

    The train split's augmentation is ``settings.preprocessing.augment``'s (``style`` adds the scanner-style steps of
    :mod:`covidxr.preprocessing.style_augment`, on the device as in loader processes). Every loader yields
    ``(images, targets, indices)`` with indices into its split.
    """
    index = {c: i for i, c in enumerate(data.classes)}
    style = style_ranges(settings.preprocessing.augment)
    rank_seed = epoch_seed + RANK_SEED_STRIDE * rank
    loaders: dict[str, Iterable] = {}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero((data.table["split"] == split).to_numpy())
        if len(rows) == 0:
            continue
        sub = data.table.iloc[rows]
        train = split == "train" and augment
        targets = [index[c] for c in sub["label"]]
        sampler = split_sampler(sub, train, settings, epoch, epoch_seed, rank, world_size)
        batches = BatchSampler(sampler, settings.batch_size, drop_last=train and len(sampler) > settings.batch_size)
        if device_images is not None:
            loaders[split] = DeviceBatches(device_images, rows, targets, batches, settings.img_size,
                                           augment_seed=rank_seed if train else None, style=style)
            continue
        transform = train_transform(settings.img_size, style=style) if train else eval_transform(settings.img_size)
        ds = XrayDataset(sub["path"].tolist(), targets, cache_size(settings.img_size), transform,
                         [data.images[i] for i in rows] if data.images is not None else None, data.pipeline)
        loaders[split] = DataLoader(ds, batch_sampler=batches, num_workers=settings.workers,
                                    pin_memory=device.type == "cuda", persistent_workers=False,
                                    generator=torch.Generator().manual_seed(rank_seed))
    return loaders


def use_device_cache(settings: LoaderSettings, data: RunData, device: torch.device) -> bool:
    """Decide ``--gpu-cache``: auto keeps the prepared squares on a CUDA device when they fit comfortably.

    Raises:
        DatasetError: ``--gpu-cache on`` without the prepared cache (``--no-cache``).
    """
    if settings.gpu_cache == "off":
        return False
    if data.images is None:
        if settings.gpu_cache == "on":
            raise DatasetError("--gpu-cache on needs the prepared cache: drop --no-cache")
        return False
    if settings.gpu_cache == "on":
        return True
    if device.type != "cuda" or not data.images:
        return False
    nbytes = sum(int(a.nbytes) for a in data.images)
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= min(GPU_CACHE_MAX_BYTES, GPU_CACHE_MAX_SHARE * free)
