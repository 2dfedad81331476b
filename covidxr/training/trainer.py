"""``python -m covidxr.train``: fine-tune a pretrained CNN on chest X-rays, split by patient.

Run folder: best.pt, last.pt, config.json, history.csv, split.csv (and unreadable.csv when files were skipped).

Speed (see also ``python -m covidxr.prepare`` and ``python -m covidxr.bench``):

* Images are decoded once into the prepared cache (``--no-cache`` decodes them every epoch instead).
* ``--gpu-cache auto|on|off``: small datasets live on the GPU as one uint8 tensor and whole batches are
  augmented there (:class:`covidxr.data.dataset.DeviceBatches`); ``on`` also works on the CPU.
* While the backbone is frozen (``--freeze-epochs``, ``--linear-probe``) the head trains on backbone features
  computed once per image, in eval mode and without augmentation (``covidxr.features``; ``--no-feature-cache``
  to pass augmented images through the frozen backbone every epoch instead).
* ``torchrun --nproc_per_node=N -m covidxr.train ...`` trains with DistributedDataParallel (NCCL on CUDA, Gloo
  on the CPU). ``--batch-size`` is per process. Rank 0 prepares the cache and splits while the others wait,
  and alone logs and writes the run folder; metrics cover every rank's predictions, each sample once. With
  ``--balance sampler/group`` every rank draws the same weighted sample of the epoch and keeps its own share
  of it, so the ranks together see what one process would. The checkpoint holds the unwrapped model;
  ``--resume`` works under torchrun as without it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)
from tqdm.auto import tqdm

from covidxr.checkpoint import load_checkpoint, save_checkpoint
from covidxr.data.cache import default_cache_dir, fill_cache
from covidxr.data.confounding import confounding_warnings
from covidxr.data.dataset import DeviceBatches, XrayDataset
from covidxr.data.manifest import class_names, dataset_root, load_manifest, resolve_data_path, validate_for_training
from covidxr.data.split import apply_split, check_no_leakage, make_split, save_split
from covidxr.errors import CovidxrError, DatasetError
from covidxr.files import atomic_write_text, remove_stale_temporaries
from covidxr.models import XrayClassifier, build_model, model_from_checkpoint, preprocess_for
from covidxr.preprocess import cache_size, eval_transform, train_transform
from covidxr.training import distributed, engine
from covidxr.training import head_features as features
from covidxr.training.config import TrainConfig, config_from_args, get_args_parser
from covidxr.training.distributed import DistInfo
from covidxr.utils import amp_dtype, autocast, library_versions, pick_device, seed_everything, setup_logging

log = logging.getLogger("covidxr.train")
HISTORY_FIELDS = ("epoch", "phase", "lr", "seconds", "train_loss", "train_acc", "train_f1", "train_auc",
                  "val_loss", "val_acc", "val_f1", "val_auc")
# Every rank augments differently: its seeds are the epoch's seed plus rank times this (rank 0: unchanged).
RANK_SEED_STRIDE = 1_000_003
# --gpu-cache auto keeps the prepared squares on the GPU up to this size and share of its free memory.
GPU_CACHE_MAX_BYTES = 4 << 30
GPU_CACHE_MAX_SHARE = 0.25
EVAL_FEATURE_BATCH = 4096  # head-only evaluation on cached features: large batches cost nothing


@dataclass
class RunData:
    """The dataset of a run after splitting and dropping unreadable files."""

    table: pd.DataFrame  # manifest rows with a split column
    classes: list[str]
    root: Path
    images: list[np.ndarray] | None  # prepared squares aligned with table rows, or None without the cache
    unreadable: dict[str, str]  # relpath -> reason


def load_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool, dist: DistInfo | None = None) -> RunData:
    """Resolve, split (or reload the run's split) and prepare the dataset; refuse unusable data early.

    Under ``torchrun`` rank 0 does this alone (splitting hashes every file; preparing fills the cache) while
    the others wait; they then receive its table and read the prepared squares from the cache.
    """
    dist = dist or DistInfo()
    data = _load_run_data(cfg, run_dir, resuming) if dist.is_main else None
    if not dist.enabled:
        return data
    shared = distributed.broadcast_object(None if data is None else replace(data, images=None), dist)
    if dist.is_main:
        return data
    images = None
    if cfg.cache:
        prepared = fill_cache(shared.table["path"].tolist(), cache_size(cfg.img_size), _cache_dir(cfg),
                              workers=min(cfg.workers, 8), desc="prepare images", progress=False)
        if prepared.failures:
            raise DatasetError(f"rank {dist.rank}: {len(prepared.failures)} image(s) unreadable here that rank 0 "
                               f"read, e.g. {next(iter(prepared.failures.values()))}")
        images = prepared.images
    return replace(shared, images=images)


def _cache_dir(cfg: TrainConfig) -> Path | None:
    if not cfg.cache:
        return None
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def _load_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool) -> RunData:
    data_path = resolve_data_path(cfg.data)
    table = exclude_rows(load_manifest(data_path), cfg.exclude_source, cfg.exclude_where)
    validate_for_training(table, str(data_path))
    for warning in confounding_warnings(table):
        log.warning("confounding: %s", warning)
    split_csv = run_dir / "split.csv"
    if resuming and split_csv.is_file():
        table = apply_split(table, split_csv)
    else:
        fractions = (1 - cfg.val_frac - cfg.test_frac, cfg.val_frac, cfg.test_frac)
        table = make_split(table, fractions, cfg.seed, cfg.holdout_source)
    check_no_leakage(table)
    classes = class_names(table)
    prepared = fill_cache(table["path"].tolist(), cache_size(cfg.img_size), _cache_dir(cfg),
                          workers=min(cfg.workers, 8), desc="prepare images")
    unreadable = {table["relpath"].iloc[i]: reason for i, reason in prepared.failures.items()}
    if unreadable and cfg.strict:
        first = next(iter(unreadable.values()))
        raise DatasetError(f"{len(unreadable)} unreadable image(s) and --strict given, e.g. {first}")
    keep = np.array([i not in prepared.failures for i in range(len(table))], dtype=bool)
    images = [img for img, ok in zip(prepared.images, keep, strict=False) if ok] if cfg.cache else None
    table = table[keep].reset_index(drop=True)
    for split in ("train", "val"):
        if (table["split"] == split).sum() == 0:
            raise DatasetError(f"the {split} split is empty: the dataset is too small for the requested fractions")
    return RunData(table, classes, dataset_root(data_path), images, unreadable)


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


def sample_weights(table: pd.DataFrame, balance: str) -> np.ndarray:
    """Per-image sampling weights that give every class (or every (class, source) group) the same total weight."""
    keys = table["label"] if balance == "sampler" else table["label"] + "\x1f" + table["source"]
    return (1.0 / keys.map(keys.value_counts())).to_numpy(dtype=np.float64)


def split_sampler(sub: pd.DataFrame, train: bool, cfg: TrainConfig, epoch: int, epoch_seed: int,
                  dist: DistInfo) -> Sampler:
    """Return the order of one split's samples for one epoch (this rank's share under ``torchrun``).

    Training: shuffled, or drawn with replacement by ``--balance sampler/group`` weights; seeded by the epoch
    (``DistributedSampler`` by ``--seed`` plus ``set_epoch``). Under ``torchrun`` the weighted draw is one
    global draw split over ranks (:class:`covidxr.distributed.DistributedWeightedSampler`). Evaluation: in
    order; under ``torchrun`` sharded with padding repeats, which :func:`covidxr.distributed.gather_epoch`
    drops again.
    """
    n = len(sub)
    if train and cfg.balance in ("sampler", "group"):
        weights = sample_weights(sub, cfg.balance)
        if dist.enabled:
            return distributed.DistributedWeightedSampler(weights, n, dist.rank, dist.world_size, epoch_seed)
        return WeightedRandomSampler(weights.tolist(), n, replacement=True,
                                     generator=torch.Generator().manual_seed(epoch_seed))
    if dist.enabled:
        sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=train,
                                     seed=cfg.seed, drop_last=train)
        sampler.set_epoch(epoch)
        return sampler
    if train:
        return RandomSampler(range(n), generator=torch.Generator().manual_seed(epoch_seed))
    return SequentialSampler(range(n))


def make_loaders(data: RunData, cfg: TrainConfig, device: torch.device, epoch_seed: int, epoch: int = 0,
                 dist: DistInfo | None = None, device_images: torch.Tensor | None = None,
                 augment: bool = True) -> dict[str, Iterable]:
    """Return train/val/test loaders; the train loader's order and augmentations follow ``epoch_seed``.

    Args:
        data: the run's data.
        cfg: the run's configuration.
        device: where batches go (pinned host memory on CUDA).
        epoch_seed: seed of this epoch's order and augmentation.
        epoch: the epoch number (``DistributedSampler.set_epoch``).
        dist: the ``torchrun`` job; each rank loads its share.
        device_images: the prepared squares of every table row already on ``device`` (``--gpu-cache``): batches
            are then cut and augmented there (:class:`covidxr.data.dataset.DeviceBatches`) instead of by a
            ``DataLoader``.
        augment: False gives the train split the evaluation transform and order (feature extraction).

    Every loader yields ``(images, targets, indices)`` with indices into its split.
    """
    dist = dist or DistInfo()
    index = {c: i for i, c in enumerate(data.classes)}
    rank_seed = epoch_seed + RANK_SEED_STRIDE * dist.rank
    loaders: dict[str, Iterable] = {}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero((data.table["split"] == split).to_numpy())
        if len(rows) == 0:
            continue
        sub = data.table.iloc[rows]
        train = split == "train" and augment
        targets = [index[c] for c in sub["label"]]
        sampler = split_sampler(sub, train, cfg, epoch, epoch_seed, dist)
        batches = BatchSampler(sampler, cfg.batch_size, drop_last=train and len(sampler) > cfg.batch_size)
        if device_images is not None:
            loaders[split] = DeviceBatches(device_images, rows, targets, batches, cfg.img_size,
                                           augment_seed=rank_seed if train else None)
            continue
        transform = train_transform(cfg.img_size) if train else eval_transform(cfg.img_size)
        ds = XrayDataset(sub["path"].tolist(), targets, cache_size(cfg.img_size), transform,
                         [data.images[i] for i in rows] if data.images is not None else None)
        loaders[split] = DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                    pin_memory=device.type == "cuda", persistent_workers=False,
                                    generator=torch.Generator().manual_seed(rank_seed))
    return loaders


def use_device_cache(cfg: TrainConfig, data: RunData, device: torch.device) -> bool:
    """Decide ``--gpu-cache``: auto keeps the prepared squares on a CUDA device when they fit comfortably.

    Raises:
        DatasetError: ``--gpu-cache on`` without the prepared cache (``--no-cache``).
    """
    if cfg.gpu_cache == "off":
        return False
    if data.images is None:
        if cfg.gpu_cache == "on":
            raise DatasetError("--gpu-cache on needs the prepared cache: drop --no-cache")
        return False
    if cfg.gpu_cache == "on":
        return True
    if device.type != "cuda" or not data.images:
        return False
    nbytes = sum(int(a.nbytes) for a in data.images)
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= min(GPU_CACHE_MAX_BYTES, GPU_CACHE_MAX_SHARE * free)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def build_optimizer(model: XrayClassifier, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW with a higher learning rate for the head, warm-up and cosine decay per step."""
    decay, no_decay = [], []
    for _name, p in model.backbone.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    backbone_lr = cfg.lr * cfg.backbone_lr_scale
    optimizer = torch.optim.AdamW([
        {"params": list(model.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": decay, "lr": backbone_lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": backbone_lr, "weight_decay": 0.0},
    ], fused=next(model.parameters()).is_cuda or None)  # one kernel per step on CUDA instead of one per tensor
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.warmup_cosine(total, warmup))
    return optimizer, scheduler


def set_backbone_frozen(model: XrayClassifier, frozen: bool) -> None:
    """Freeze or unfreeze every backbone parameter."""
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def checkpoint_dict(model: XrayClassifier, cfg: TrainConfig, data: RunData, state: dict, full: bool,
                    optimizer=None, scheduler=None, scaler=None) -> dict:
    """Assemble the self-describing checkpoint (optimizer/scheduler/scaler/RNG state only when ``full``)."""
    ckpt = {
        "arch": model.arch,
        "classes": list(data.classes),
        "preprocess": preprocess_for(model, cfg.img_size).to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "split": {c: data.table[c].astype(str).tolist() for c in ("relpath", "label", "patient_id", "split")},
        "data": {"root": str(data.root), "n_images": len(data.table), "unreadable": data.unreadable},
        "history": state["history"],
        "epoch": state["epoch"],
        "best_auc": state["best_auc"],
        "best_epoch": state["best_epoch"],
        "epochs_since_best": state["epochs_since_best"],
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if full:
        ckpt |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    return ckpt


def write_history(path: Path, history: list[dict]) -> None:
    """Write history.csv atomically."""
    lines = [",".join(HISTORY_FIELDS)]
    for row in history:
        lines.append(",".join("" if row.get(k) is None else str(row[k]) for k in HISTORY_FIELDS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def fmt(x: float) -> str:
    return "  nan" if x != x else f"{x:.3f}"


def run(cfg: TrainConfig) -> Path:
    """Train according to ``cfg`` and return the run folder (under ``torchrun``: one process of the job)."""
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        epochs = cfg.epochs
        cfg = TrainConfig.from_dict({**resume["config"], "resume": cfg.resume})
        cfg.epochs = max(cfg.epochs, epochs) if epochs != TrainConfig.epochs else cfg.epochs
    dist = distributed.env_info()
    device = distributed.setup(dist, pick_device(cfg.device))
    try:
        return _train(cfg, resume, dist, device)
    finally:
        distributed.cleanup(dist)


@dataclass
class Trainer:
    """What one epoch needs: the model (and its DDP wrapper), optimisation state and the run's data."""

    model: XrayClassifier
    cfg: TrainConfig
    data: RunData
    dist: DistInfo
    device: torch.device
    amp: Callable
    channels_last: bool
    criterion: nn.Module
    eval_criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device_images: torch.Tensor | None
    feature_sets: dict[str, features.FeatureSet] | None = None  # while the backbone stays frozen
    ddp: DistributedDataParallel | None = None
    ddp_frozen: bool | None = None

    def loaders(self, epoch: int, epoch_seed: int, augment: bool = True) -> dict[str, Iterable]:
        return make_loaders(self.data, self.cfg, self.device, epoch_seed, epoch, self.dist, self.device_images,
                            augment)

    def network(self, frozen: bool) -> nn.Module:
        """The model to train, wrapped in DDP under torchrun (again when the frozen parameters change)."""
        if not self.dist.enabled:
            return self.model
        if self.ddp is None or self.ddp_frozen != frozen:
            # DDP only synchronises parameters that require grad when it is built.
            self.ddp = None
            self.ddp = DistributedDataParallel(self.model,
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.ddp_frozen = frozen
        return self.ddp

    def image_epoch(self, epoch: int, epoch_seed: int, frozen: bool) -> tuple[engine.EpochOutput,
                                                                              engine.EpochOutput]:
        """Train on augmented images through the network, then validate."""
        self.feature_sets = None
        loaders = self.loaders(epoch, epoch_seed)
        progress = self.dist.is_main
        tr = engine.train_one_epoch(self.network(frozen), loaders["train"], self.criterion, self.optimizer,
                                    self.scheduler, self.scaler, self.device, self.amp,
                                    desc=f"epoch {epoch}/{self.cfg.epochs}", channels_last=self.channels_last,
                                    frozen_backbone=frozen, progress=progress)
        # Ranks update BatchNorm statistics on their own batches: validate (and save) rank 0's.
        distributed.broadcast_module(self.model, self.dist, buffers_only=True)
        va = engine.predict_loader(self.model, loaders["val"], self.device, self.amp, self.eval_criterion,
                                   desc="validate", channels_last=self.channels_last, progress=progress)
        return distributed.gather_epoch(tr, self.dist, dedupe=False), distributed.gather_epoch(va, self.dist, True)

    def feature_epoch(self, epoch: int, epoch_seed: int) -> tuple[engine.EpochOutput, engine.EpochOutput]:
        """Train the head on cached backbone features (computed on first use), then validate on them."""
        if self.feature_sets is None:
            self.feature_sets = self.extract_features(epoch, epoch_seed)
        sampler = split_sampler(self._split("train"), True, self.cfg, epoch, epoch_seed, self.dist)
        batches = BatchSampler(sampler, self.cfg.batch_size, drop_last=len(sampler) > self.cfg.batch_size)
        tr = features.train_head_epoch(
            self.model.head, self.feature_sets["train"], batches, self.criterion, self.optimizer, self.scheduler,
            self.scaler, self.amp, lambda: distributed.average_gradients(self.model.head.parameters(), self.dist),
            desc=f"epoch {epoch}/{self.cfg.epochs} head", progress=self.dist.is_main)
        n_val = len(self.feature_sets["val"])
        val_batches = BatchSampler(SequentialSampler(range(n_val)), EVAL_FEATURE_BATCH, drop_last=False)
        # Every rank holds all validation features and the same head: no sharding needed.
        va = features.predict_head(self.model.head, self.feature_sets["val"], val_batches, self.amp,
                                   self.eval_criterion)
        return distributed.gather_epoch(tr, self.dist, dedupe=False), va

    def extract_features(self, epoch: int, epoch_seed: int) -> dict[str, features.FeatureSet]:
        """One eval-mode, un-augmented backbone pass over the train and val images (sharded over ranks)."""
        start = time.perf_counter()
        distributed.broadcast_module(self.model, self.dist)
        loaders = self.loaders(epoch, epoch_seed, augment=False)
        out = {}
        for split in ("train", "val"):
            feats, targets, indices = features.extract_features(self.model, loaders[split], self.device, self.amp,
                                                                self.channels_last, progress=self.dist.is_main)
            feats, targets, indices = (distributed.gather_rows(t, self.dist) for t in (feats, targets, indices))
            out[split] = features.assemble(feats, targets, indices, len(self._split(split)))
        log.info("backbone features of %d images computed once in %.1fs: frozen epochs train the head on them "
                 "(un-augmented)", sum(len(f) for f in out.values()), time.perf_counter() - start)
        return out

    def _split(self, split: str) -> pd.DataFrame:
        return self.data.table[self.data.table["split"] == split]


def _train(cfg: TrainConfig, resume: dict | None, dist: DistInfo, device: torch.device) -> Path:
    if resume is not None:
        run_dir = Path(cfg.resume).resolve().parent
    else:
        run_dir = Path(cfg.out or f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir = Path(distributed.broadcast_object(str(run_dir), dist))  # one folder even if the clocks differ
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a run killed while saving
    seed_everything(cfg.seed)
    dtype = amp_dtype(device) if cfg.amp else None
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = load_run_data(cfg, run_dir, resuming=resume is not None, dist=dist)
    if resume is not None and resume["classes"] != data.classes:
        raise DatasetError(f"dataset classes {data.classes} differ from the checkpoint's {resume['classes']}")
    if dist.is_main:
        write_run_files(run_dir, cfg, data, dist)

    model = model_from_checkpoint(resume, cfg.resume) if resume is not None else build_model(
        cfg.arch, len(data.classes), cfg.weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    device_images = None
    # Rank 0 decides for all: ranks with different free memory must still cut the same batches.
    if distributed.broadcast_object(use_device_cache(cfg, data, device) if dist.is_main else None, dist):
        device_images = torch.from_numpy(np.stack(data.images)).to(device)
        log.info("prepared images held on %s (%.0f MB): batches are augmented there", device,
                 device_images.numel() / 2**20)
    train_targets = np.array([data.classes.index(c) for c in data.table.loc[data.table["split"] == "train", "label"]])
    weight = class_weights(train_targets, len(data.classes)).to(device) if cfg.balance == "loss" else None
    steps = len(make_loaders(data, cfg, device, cfg.seed, 1, dist, device_images)["train"])
    optimizer, scheduler = build_optimizer(model, cfg, steps)
    trainer = Trainer(model, cfg, data, dist, device, autocast(device, dtype), channels_last,
                      nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing),
                      nn.CrossEntropyLoss(weight=weight), optimizer, scheduler,
                      torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), device_images)
    state = {"history": [], "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "epochs_since_best": 0}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        trainer.scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log.info("resuming %s after epoch %d", cfg.resume, state["epoch"])

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.patience and state["epochs_since_best"] >= cfg.patience:
            log.info("early stop: no better validation macro ROC-AUC for %d epochs", cfg.patience)
            break
        run_epoch(trainer, epoch, state, run_dir)
    summary = (f"done: best validation macro ROC-AUC {state['best_auc']:.3f} at epoch {state['best_epoch']}; "
               f"run folder {run_dir}")
    if data.unreadable:
        summary += f"; {len(data.unreadable)} unreadable image(s) skipped (unreadable.csv)"
    log.info(summary)
    return run_dir


def write_run_files(run_dir: Path, cfg: TrainConfig, data: RunData, dist: DistInfo) -> None:
    """Write split.csv, config.json and unreadable.csv, and log the class counts (rank 0 only)."""
    save_split(data.table, run_dir / "split.csv")
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    if data.unreadable:
        atomic_write_text(run_dir / "unreadable.csv", "relpath,reason\n" + "".join(
            f"{_csv_cell(k)},{_csv_cell(v)}\n" for k, v in data.unreadable.items()))
        log.warning("skipped %d unreadable image(s), listed in %s", len(data.unreadable), run_dir / "unreadable.csv")
    counts = data.table.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("data %s: %d images, classes %s\n%s", data.root, len(data.table), data.classes, counts.to_string())
    if dist.enabled:
        log.info("torchrun: %d processes, batch size %d per process (%d per step)", dist.world_size,
                 cfg.batch_size, cfg.batch_size * dist.world_size)


def run_epoch(trainer: Trainer, epoch: int, state: dict, run_dir: Path) -> None:
    """Train and validate one epoch, update ``state``, and (rank 0) write history and checkpoints."""
    cfg, dist = trainer.cfg, trainer.dist
    # Every epoch's randomness derives from (seed, epoch), so a resumed run repeats an uninterrupted one.
    epoch_seed = cfg.seed * 100_003 + epoch
    torch.manual_seed(epoch_seed + RANK_SEED_STRIDE * dist.rank)
    frozen = cfg.linear_probe or epoch <= cfg.freeze_epochs
    set_backbone_frozen(trainer.model, frozen)
    start = time.perf_counter()
    if frozen and cfg.feature_cache:
        tr, va = trainer.feature_epoch(epoch, epoch_seed)
    else:
        tr, va = trainer.image_epoch(epoch, epoch_seed, frozen)
    seconds = time.perf_counter() - start
    n_classes = len(trainer.data.classes)
    trm = engine.summary_metrics(tr.logits, tr.targets, n_classes)
    vam = engine.summary_metrics(va.logits, va.targets, n_classes)
    row = {"epoch": epoch, "phase": "head" if frozen else "full", "lr": trainer.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 2), "train_loss": tr.loss, **{f"train_{k}": v for k, v in trm.items()},
           "val_loss": va.loss, **{f"val_{k}": v for k, v in vam.items()}}
    state["history"].append(row)
    state["epoch"] = epoch
    score = vam["auc"] if vam["auc"] == vam["auc"] else vam["acc"]
    improved = score > state["best_auc"]
    if improved:
        state |= {"best_auc": score, "best_epoch": epoch, "epochs_since_best": 0}
    else:
        state["epochs_since_best"] += 1
    if not dist.is_main:
        return
    tqdm.write(f"epoch {epoch:3d} [{row['phase']}] {seconds:6.1f}s | train loss {tr.loss:.4f} "
               f"acc {fmt(trm['acc'])} f1 {fmt(trm['f1'])} auc {fmt(trm['auc'])} | val loss {va.loss:.4f} "
               f"acc {fmt(vam['acc'])} "
               f"f1 {fmt(vam['f1'])} auc {fmt(vam['auc'])}{'  *best*' if improved else ''}", file=sys.stderr)
    write_history(run_dir / "history.csv", state["history"])
    model, data = trainer.model, trainer.data
    if improved:
        save_checkpoint(run_dir / "best.pt", checkpoint_dict(model, cfg, data, state, full=False))
    save_checkpoint(run_dir / "last.pt", checkpoint_dict(model, cfg, data, state, True, trainer.optimizer,
                                                         trainer.scheduler, trainer.scaler))


def _csv_cell(text: str) -> str:
    return '"' + str(text).replace('"', '""') + '"' if any(c in str(text) for c in ',"\n') else str(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if not distributed.env_info().is_main:
        logging.getLogger().setLevel(logging.ERROR)  # under torchrun only rank 0 reports
    try:
        cfg = config_from_args(args)
        if cfg.val_frac + cfg.test_frac >= 1:
            parser.error("--val-frac plus --test-frac must leave images for training")
        run(cfg)
    except CovidxrError as exc:
        print(f"covidxr.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidxr.train: interrupted; continue with --resume RUN/last.pt", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
