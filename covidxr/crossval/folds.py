"""The folds of a cross-validation by source: the data read once, one patient-level split per held-out source, and
the model trained without that source.

``probe`` (the CPU default) passes every image once through the ImageNet backbone, with the project's reader, cache
and evaluation preprocessing, and then trains only the linear head of each fold on those features, with the
training loop of ``python -m covidxr.train --linear-probe`` (same optimiser, class weights, schedule, early stopping
and checkpoints). ``finetune`` runs ``python -m covidxr.train``'s whole recipe per fold (meant for a GPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from covidxr.data.loaders import LoaderSettings, RunData, cache_dir, input_pipeline, make_loaders, prepare_rows
from covidxr.data.manifest import class_names, dataset_root, load_manifest, resolve_data_path, validate_for_training
from covidxr.data.split import check_no_leakage, make_split
from covidxr.errors import DatasetError
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.input_pipeline import InputPipeline
from covidxr.model.trained import TrainedModel
from covidxr.networks.architectures import build_model
from covidxr.preprocessing.settings import InputSettings, settings_from_dict
from covidxr.training import distributed
from covidxr.training import head_features as features
from covidxr.training.config import TrainConfig
from covidxr.training.run_files import write_run_files
from covidxr.training.trainer import build_trainer, fit, new_state, run
from covidxr.utils import amp_dtype, autocast, seed_everything

log = logging.getLogger("covidxr.crossval")
MODES = ("probe", "finetune")


@dataclass(frozen=True)
class CrossvalConfig:
    """Settings of one cross-validation (the command-line arguments); the lung crop and mask, equalisation and lung
    model are its ``preprocessing`` (:class:`~covidxr.preprocessing.settings.InputSettings`), which every fold trains
    with."""

    data: str
    out: Path
    preprocessing: InputSettings = field(default_factory=InputSettings)
    by: str = "source"
    mode: str = "probe"  # probe: linear head on backbone features computed once; finetune: the full recipe per fold
    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"
    img_size: int = 224
    min_images: int = 30  # a source with fewer readable images is not held out (it stays in training)
    val_frac: float = 0.15
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    bootstrap: int = 1000
    device: str = "auto"
    workers: int = 2
    cache_dir: str | None = None
    balance: str = "loss"  # class imbalance in each fold's training (python -m covidxr.train --balance)
    loss: str = "softmax"  # python -m covidxr.train --loss
    epoch_size: int = 0  # python -m covidxr.train --epoch-size
    fold: list[str] = field(default_factory=list)  # hold out only these sources (default: every large enough one)
    command: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> CrossvalConfig:
        """Build from the flat command-line arguments (``vars(args)``), ignoring keys of other settings."""
        return settings_from_dict(cls, d)

    def train_config(self, held_out: str, fold_dir: Path) -> TrainConfig:
        """The training run of the fold that leaves ``held_out`` out: train/val from the rest, ``held_out`` as test."""
        return TrainConfig(data=self.data, val_frac=self.val_frac, test_frac=0.0, holdout_source=[held_out],
                           cache_dir=self.cache_dir, arch=self.arch, weights=self.weights, img_size=self.img_size,
                           epochs=self.epochs, batch_size=self.batch_size, linear_probe=self.mode == "probe",
                           device=self.device, workers=self.workers, seed=self.seed, out=str(fold_dir),
                           balance=self.balance, loss=self.loss, epoch_size=self.epoch_size,
                           preprocessing=self.preprocessing)


@dataclass
class AllData:
    """Every readable image of the dataset, prepared once, in manifest order."""

    manifest: pd.DataFrame  # every manifest row (splits are made on these, as training makes them)
    table: pd.DataFrame  # the readable rows
    images: list[np.ndarray] | None
    unreadable: dict[str, str]
    classes: list[str]
    root: Path
    settings: LoaderSettings
    pipeline: InputPipeline  # lung crop and equalisation that prepared ``images``


def fold_name(source: str) -> str:
    """A file-name-safe name for a source."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-") or "source"


def load_all(cfg: CrossvalConfig) -> AllData:
    """Read the manifest and decode (or read from the cache) every image once."""
    settings = LoaderSettings(data=cfg.data, cache_dir=cfg.cache_dir, img_size=cfg.img_size,
                              batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                              preprocessing=cfg.preprocessing)
    path = resolve_data_path(cfg.data)
    manifest = load_manifest(path)
    validate_for_training(manifest, str(path))
    if cfg.by not in manifest.columns or (manifest[cfg.by].astype(str).str.strip() == "").all():
        raise DatasetError(f"{path}: no {cfg.by!r} column to hold out by")
    pipeline = input_pipeline(settings)
    table, images, unreadable = prepare_rows(manifest, settings, pipeline=pipeline)
    return AllData(manifest, table, images, unreadable, class_names(manifest), dataset_root(path), settings, pipeline)


def held_out_sources(data: AllData, min_images: int) -> tuple[list[str], dict[str, int]]:
    """``(sources to hold out, {too small source: images})``, by readable images, largest first."""
    counts = data.table["source"].astype(str).value_counts()
    return [s for s, n in counts.items() if n >= min_images], {s: int(n) for s, n in counts.items() if n < min_images}


def classes_missing_elsewhere(table: pd.DataFrame, held_out: str) -> list[str]:
    """The classes of ``held_out``'s images that no other source has: a model trained without ``held_out`` never saw
    them, so the fold cannot measure them (the fold is valid only when this is empty)."""
    source = table["source"].astype(str)
    here, elsewhere = set(table.loc[source == held_out, "label"]), set(table.loc[source != held_out, "label"])
    return sorted(here - elsewhere)


def fold_split(data: AllData, held_out: str, cfg: CrossvalConfig) -> pd.DataFrame:
    """The readable rows with a ``split`` column: ``held_out`` is test, the rest a patient-level train/val split.

    Raises:
        DatasetError: An image of the held-out source (or one of its patients) would be in train or val.
    """
    split = make_split(data.manifest, (1 - cfg.val_frac, cfg.val_frac, 0.0), cfg.seed, [held_out])
    split = split[split["relpath"].isin(set(data.table["relpath"]))].reset_index(drop=True)
    check_no_leakage(split)
    if (split.loc[split["source"] == held_out, "split"] != "test").any() or \
            (split.loc[split["source"] != held_out, "split"] == "test").any():
        raise DatasetError(f"fold {held_out!r}: the held-out source and the test fold differ")
    return split


def backbone_features(data: AllData, cfg: CrossvalConfig, device: torch.device) -> features.FeatureSet:
    """The ImageNet backbone's features of every readable image (eval mode, evaluation preprocessing), once.

    They depend on neither the seed nor the fold, so they are kept in the prepared cache's ``features/`` folder, keyed
    by the architecture, weights, size, input pipeline and the prepared images' cache entries: the seeds of a recipe
    (and a rerun) compute them once.
    """
    cache = _features_file(data, cfg)
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location=device, weights_only=True)
        if stored["features"].shape[0] == len(data.table):
            return features.FeatureSet(stored["features"], stored["targets"])
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, len(data.classes), cfg.weights).to(device)
    everything = RunData(data.table.assign(split="test"), data.classes, data.root, data.images, data.unreadable,
                         data.pipeline)
    loader = make_loaders(everything, data.settings, device, cfg.seed)["test"]
    amp = autocast(device, amp_dtype(device))
    feats, targets, indices = features.extract_features(model, loader, device, amp)
    result = features.assemble(feats, targets, indices, len(data.table))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(cache, {"features": result.features.cpu(), "targets": result.targets.cpu()})
    return result


def _features_file(data: AllData, cfg: CrossvalConfig) -> Path | None:
    if not data.settings.cache or cfg.weights not in ("imagenet", "none"):
        return None
    ident = json.dumps([cfg.arch, cfg.weights, cfg.img_size, data.pipeline.key, data.classes,
                        [os.path.abspath(data.root / p) for p in data.table["relpath"]],
                        [int(os.stat(data.root / p).st_mtime_ns) for p in data.table["relpath"]]])
    return cache_dir(data.settings) / "features" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.pt"


def _fold_data(data: AllData, split: pd.DataFrame) -> RunData:
    """The fold as a training run sees it (rows in ``data.table`` order, so image i is row i)."""
    if not split["relpath"].equals(data.table["relpath"]):
        raise DatasetError("fold rows are not in the dataset's order")
    return RunData(split, data.classes, data.root, data.images, data.unreadable, data.pipeline)


def _rows(feature_set: features.FeatureSet, mask: np.ndarray) -> features.FeatureSet:
    index = torch.as_tensor(np.flatnonzero(mask), device=feature_set.features.device)
    return features.FeatureSet(feature_set.features[index], feature_set.targets[index])


def probe_fold(data: AllData, split: pd.DataFrame, feature_set: features.FeatureSet, cfg: CrossvalConfig,
               held_out: str, fold_dir: Path, device: torch.device) -> tuple[np.ndarray, int]:
    """Train a linear head without ``held_out`` on the cached features; return (test logits, best epoch).

    The fold folder is a real run folder (split.csv, config.json, history.csv, best.pt); last.pt is dropped.
    """
    tcfg = cfg.train_config(held_out, fold_dir)
    run_data = _fold_data(data, split)
    fold_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.env_info()
    seed_everything(cfg.seed)
    write_run_files(fold_dir, tcfg, run_data, dist)
    trainer = build_trainer(tcfg, run_data, dist, device, None)
    roles = split["split"].to_numpy()
    trainer.feature_sets = {s: _rows(feature_set, roles == s) for s in ("train", "val")}
    state = fit(trainer, new_state(), fold_dir)
    (fold_dir / "last.pt").unlink(missing_ok=True)  # a probe fold is never resumed
    trainer.model.load_state_dict(load_checkpoint(fold_dir / "best.pt")["model"])
    test = _rows(feature_set, roles == "test")
    batches = BatchSampler(SequentialSampler(range(len(test))), 4096, drop_last=False)
    out = features.predict_head(trainer.model.head, test, batches, trainer.amp)
    return out.logits, int(state["best_epoch"])


def finetune_fold(data: AllData, split: pd.DataFrame, cfg: CrossvalConfig, held_out: str, fold_dir: Path,
                  device: torch.device) -> tuple[np.ndarray, int]:
    """Run ``python -m covidxr.train`` without ``held_out``; return (test logits of its best.pt, best epoch).

    Raises:
        DatasetError: The training run split the data differently from ``split``.
    """
    run(cfg.train_config(held_out, fold_dir))
    written = pd.read_csv(fold_dir / "split.csv", dtype=str, keep_default_na=False)
    if dict(zip(written["relpath"], written["split"], strict=True)) != dict(zip(split["relpath"], split["split"],
                                                                               strict=True)):
        raise DatasetError(f"fold {held_out!r}: the training run's split.csv differs from the fold's split")
    model = TrainedModel.load(fold_dir / "best.pt", device=device)
    test = (split["split"] == "test").to_numpy()
    images = [img for img, keep in zip(data.images, test, strict=True) if keep] if data.images is not None else None
    rows = RunData(split[test].reset_index(drop=True), data.classes, data.root, images, {}, data.pipeline)
    loader = make_loaders(rows, data.settings, device, cfg.seed)["test"]
    out = model.run_loader(loader, desc="predict held-out")
    logits = np.empty_like(out.logits)
    logits[out.indices] = out.logits
    return logits, int(model.record["best_epoch"])


def train_fold(data: AllData, held_out: str, cfg: CrossvalConfig, feature_set: features.FeatureSet | None,
               device: torch.device) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Split, train and predict one fold: ``(split of the readable rows, test logits in row order, best epoch)``."""
    split = fold_split(data, held_out, cfg)
    fold_dir = cfg.out / f"fold-{fold_name(held_out)}"
    log.info("fold %r: %s", held_out, split["split"].value_counts().to_dict())
    if cfg.mode == "probe":
        logits, best = probe_fold(data, split, feature_set, cfg, held_out, fold_dir, device)
    else:
        logits, best = finetune_fold(data, split, cfg, held_out, fold_dir, device)
    return split, logits, best

