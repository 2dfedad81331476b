"""The training run: data shared over ranks, the model and optimiser, the epoch loop, early stopping, checkpoints.

The command line is :mod:`covidxr.training.__main__` (``python -m covidxr.train``).
"""

from __future__ import annotations

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
from torch.utils.data import BatchSampler, SequentialSampler
from tqdm.auto import tqdm

from covidxr.data.loaders import (
    RANK_SEED_STRIDE,
    LoaderSettings,
    RunData,
    load_run_data,
    make_loaders,
    prepare_rows,
    split_sampler,
    use_device_cache,
)
from covidxr.data.manifest import resolve_data_path
from covidxr.data.split import saved_split
from covidxr.errors import CovidxrError, DatasetError, one_line
from covidxr.files import remove_stale_temporaries
from covidxr.inference.gate_fit import fit_checkpoint
from covidxr.model.build import model_from_checkpoint
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.networks.architectures import XrayClassifier, build_model
from covidxr.networks.batches import EpochOutput, predict_loader
from covidxr.training import distributed, engine
from covidxr.training import head_features as features
from covidxr.training.adversary import AdversarialNetwork, build_adversarial
from covidxr.training.config import TrainConfig
from covidxr.training.contrast import contrast_criterion, within_source_auc
from covidxr.training.distributed import DistInfo
from covidxr.training.run_files import checkpoint_dict, write_history, write_run_files
from covidxr.utils import amp_dtype, autocast, pick_device, seed_everything, softmax

log = logging.getLogger("covidxr.train")
EVAL_FEATURE_BATCH = 4096  # head-only evaluation on cached features: large batches cost nothing


def run(cfg: TrainConfig, resume: dict | None = None) -> Path:
    """Train according to ``cfg`` and return the run folder (under ``torchrun``: one process of the job).

    ``resume`` is the loaded ``cfg.resume`` checkpoint (loaded here when not given); ``cfg`` is then the stored
    run's config (:func:`covidxr.training.config.config_from_args`).
    """
    if resume is None and cfg.resume:
        resume = load_checkpoint(cfg.resume)
    if cfg.data is None:
        # Record where the data came from ($COVIDXR_DATA or data/cxr): evaluation reads the run's data from here.
        cfg = replace(cfg, data=str(resolve_data_path(None)))
    dist = distributed.env_info()
    device = distributed.setup(dist, pick_device(cfg.device))
    try:
        return _train(cfg, resume, dist, device)
    finally:
        distributed.cleanup(dist)


def shared_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool, dist: DistInfo,
                    lung_entry: dict | None = None) -> RunData:
    """Load the run's data (reloading its split when resuming); refuse unusable data early.

    ``lung_entry`` is the lung model of the checkpoint being resumed (a lung crop then keeps using it).

    Under ``torchrun`` rank 0 does this alone (splitting hashes every file; preparing fills the cache) while
    the others wait; they then receive its table and read the prepared squares from the cache.
    """
    settings = replace(cfg.loader_settings(), lung_entry=lung_entry)
    split_csv = run_dir / "split.csv"
    split = split_csv if resuming and split_csv.is_file() else saved_split(cfg.split_from)
    data = load_run_data(settings, split) if dist.is_main else None
    if not dist.enabled:
        return data
    shared = distributed.broadcast_object(None if data is None else replace(data, images=None), dist)
    if dist.is_main:
        return data
    if not cfg.cache:
        return shared
    _, images, unreadable = prepare_rows(shared.table, settings, progress=False, pipeline=shared.pipeline)
    if unreadable:
        raise DatasetError(f"rank {dist.rank}: {len(unreadable)} image(s) unreadable here that rank 0 read, "
                           f"e.g. {next(iter(unreadable.values()))}")
    return replace(shared, images=images)


@dataclass
class Trainer:
    """What one epoch needs: the model (and its DDP wrapper), optimisation state and the run's data."""

    model: XrayClassifier
    cfg: TrainConfig
    settings: LoaderSettings  # cfg's data and loader settings
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
    compiled: nn.Module | None = None  # torch.compile of the training network (--compile)
    compiled_base: nn.Module | None = None  # the network that ``compiled`` compiles
    adversarial: AdversarialNetwork | None = None  # the model with its source adversary (--adversary)
    sources: torch.Tensor | None = None  # each training row's source index, with --adversary

    def loaders(self, epoch: int, epoch_seed: int, augment: bool = True) -> dict[str, Iterable]:
        return make_loaders(self.data, self.settings, self.device, epoch_seed, epoch, self.dist.rank,
                            self.dist.world_size, self.device_images, augment)

    def network(self, frozen: bool) -> nn.Module:
        """The model to train: wrapped in DDP under torchrun (again when the frozen parameters change), then
        compiled with ``--compile``; with ``--adversary`` and a backbone that trains, the model and its source
        adversary."""
        base = self.adversarial if self.adversarial is not None and not frozen else self.model
        if self.dist.enabled and (self.ddp is None or self.ddp_frozen != frozen):
            # DDP only synchronises parameters that require grad when it is built.
            self.ddp = None
            self.ddp = DistributedDataParallel(base,
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.ddp_frozen = frozen
        network = self.ddp if self.dist.enabled else base
        if not self.cfg.compile:
            return network
        if self.compiled_base is not network:
            self.compiled, self.compiled_base = torch.compile(network), network
        return self.compiled

    def image_epoch(self, epoch: int, epoch_seed: int, frozen: bool) -> tuple[EpochOutput, EpochOutput]:
        """Train on augmented images through the network, then validate."""
        self.feature_sets = None
        loaders = self.loaders(epoch, epoch_seed)
        progress = self.dist.is_main
        tr = engine.train_one_epoch(self.network(frozen), loaders["train"], self.criterion, self.optimizer,
                                    self.scheduler, self.scaler, self.device, self.amp,
                                    desc=f"epoch {epoch}/{self.cfg.epochs}", channels_last=self.channels_last,
                                    frozen_backbone=frozen, progress=progress,
                                    sources=None if frozen else self.sources)
        # Ranks update BatchNorm statistics on their own batches: validate (and save) rank 0's.
        distributed.broadcast_module(self.model, self.dist, buffers_only=True)
        va = predict_loader(self.model, loaders["val"], self.device, self.amp, self.eval_criterion, desc="validate",
                            channels_last=self.channels_last, progress=progress)
        return distributed.gather_epoch(tr, self.dist, dedupe=False), distributed.gather_epoch(va, self.dist, True)

    def feature_epoch(self, epoch: int, epoch_seed: int) -> tuple[EpochOutput, EpochOutput]:
        """Train the head on cached backbone features (computed on first use), then validate on them."""
        if self.feature_sets is None:
            self.feature_sets = self.extract_features(epoch, epoch_seed)
        sampler = split_sampler(self._split("train"), True, self.settings, epoch, epoch_seed, self.dist.rank,
                                self.dist.world_size)
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
    run_dir = _run_folder(cfg, resume is not None, dist)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = shared_run_data(cfg, run_dir, resuming=resume is not None, dist=dist,
                           lung_entry=None if resume is None else resume.get("lung_model"))
    if resume is not None and resume["classes"] != data.classes:
        raise DatasetError(f"dataset classes {data.classes} differ from the checkpoint's {resume['classes']}")
    if dist.is_main:
        write_run_files(run_dir, cfg, data, dist)
    trainer = build_trainer(cfg, data, dist, device, resume)
    state = new_state()
    if resume is not None:
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.scheduler.load_state_dict(resume["scheduler"])
        trainer.scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log.info("resuming %s after epoch %d", cfg.resume, state["epoch"])

    fit(trainer, state, run_dir)
    score = "within-source ROC-AUC" if cfg.loss == "contrast" else "macro ROC-AUC"
    summary = (f"done: best validation {score} {state['best_auc']:.3f} at epoch {state['best_epoch']}; "
               f"run folder {run_dir}")
    if data.unreadable:
        summary += f"; {len(data.unreadable)} unreadable image(s) skipped (unreadable.csv)"
    log.info(summary)
    if dist.is_main and cfg.gate and (run_dir / "best.pt").is_file():
        fit_run_gate(run_dir / "best.pt", cfg, data)
    return run_dir


def new_state() -> dict:
    """The epoch loop's state before the first epoch."""
    return {"history": [], "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "epochs_since_best": 0}


def fit(trainer: Trainer, state: dict, run_dir: Path) -> dict:
    """Run the epochs after ``state["epoch"]`` up to ``cfg.epochs``, stopping early after ``cfg.patience`` epochs
    without a better validation macro ROC-AUC; return ``state`` (updated in place)."""
    cfg = trainer.cfg
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.patience and state["epochs_since_best"] >= cfg.patience:
            log.info("early stop: no better validation macro ROC-AUC for %d epochs", cfg.patience)
            break
        run_epoch(trainer, epoch, state, run_dir)
    return state
def fit_run_gate(best: Path, cfg: TrainConfig, data: RunData) -> None:
    """Fit the input gate of ``best`` on the run's own split (a failure is logged: the trained run stays usable)."""
    try:
        gate = fit_checkpoint(best, device=cfg.device, data=cfg.data, laterals=cfg.gate_laterals, run=data)
    except CovidxrError as exc:
        log.warning("input gate not fitted (%s); fit it later with python -m covidxr.gate fit --checkpoint %s",
                    one_line(exc), best)
        return
    log.info("input gate fitted and written beside %s: %s", best,
             ", ".join(f"{k} {v:.1%}" for k, v in gate.info["validation"].items()))


def _run_folder(cfg: TrainConfig, resuming: bool, dist: DistInfo) -> Path:
    if resuming:
        run_dir = Path(cfg.resume).resolve().parent
    else:
        run_dir = Path(cfg.out or f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir = Path(distributed.broadcast_object(str(run_dir), dist))  # one folder even if the clocks differ
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a run killed while saving
    return run_dir


def build_trainer(cfg: TrainConfig, data: RunData, dist: DistInfo, device: torch.device,
                  resume: dict | None) -> Trainer:
    """The model (new or from ``resume``) on ``device``, its losses, optimiser and schedule, and the batches' home."""
    dtype = amp_dtype(device) if cfg.amp else None
    channels_last = cfg.channels_last and device.type == "cuda"
    model = model_from_checkpoint(resume, cfg.resume) if resume is not None else build_model(
        cfg.arch, len(data.classes), cfg.weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    settings = cfg.loader_settings()
    device_images = None
    # Rank 0 decides for all: ranks with different free memory must still cut the same batches.
    if distributed.broadcast_object(use_device_cache(settings, data, device) if dist.is_main else None, dist):
        device_images = torch.from_numpy(np.stack(data.images)).to(device)
        log.info("prepared images held on %s (%.0f MB): batches are augmented there", device,
                 device_images.numel() / 2**20)
    train_targets = np.array([data.classes.index(c) for c in data.table.loc[data.table["split"] == "train", "label"]])
    weight = class_weights(train_targets, len(data.classes)).to(device) if cfg.balance == "loss" else None
    train_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing) if cfg.loss == "softmax" \
        else contrast_criterion(data.table[data.table["split"] == "train"], data.classes).to(device)
    steps = len(make_loaders(data, settings, device, cfg.seed, 1, dist.rank, dist.world_size, device_images)["train"])
    adversarial, sources = None, None
    if cfg.adversary > 0:
        adversarial, sources = build_adversarial(model, data.table[data.table["split"] == "train"], data.classes,
                                                  cfg.adversary)
        adversarial.adversary.to(device)
        if resume is not None and "adversary" in resume:
            adversarial.adversary.load_state_dict(resume["adversary"])
    optimizer, scheduler = build_optimizer(model, cfg, steps, adversarial)
    return Trainer(model, cfg, settings, data, dist, device, autocast(device, dtype), channels_last,
                   train_loss, nn.CrossEntropyLoss(weight=weight), optimizer, scheduler,
                   torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), device_images,
                   adversarial=adversarial, sources=sources)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def build_optimizer(model: XrayClassifier, cfg: TrainConfig, steps_per_epoch: int,
                    adversarial: AdversarialNetwork | None = None):
    """AdamW with a higher learning rate for the head (and the source adversary), warm-up and cosine decay per
    step."""
    decay, no_decay = [], []
    for _name, p in model.backbone.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    backbone_lr = cfg.lr * cfg.backbone_lr_scale
    groups = [
        {"params": list(model.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": decay, "lr": backbone_lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": backbone_lr, "weight_decay": 0.0},
    ]
    if adversarial is not None:
        groups.append({"params": list(adversarial.adversary.parameters()), "lr": cfg.lr,
                       "weight_decay": cfg.weight_decay})
    # fused: one kernel per step on CUDA instead of one per tensor
    optimizer = torch.optim.AdamW(groups, fused=next(model.parameters()).is_cuda or None)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.warmup_cosine(total, warmup))
    return optimizer, scheduler


def set_backbone_frozen(model: XrayClassifier, frozen: bool) -> None:
    """Freeze or unfreeze every backbone parameter."""
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def fmt(x: float) -> str:
    return "  nan" if x != x else f"{x:.3f}"


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
    if cfg.loss == "contrast":  # the best epoch by the contrasts inside each validation source only
        vam["auc_within_source"] = within_source_auc(softmax(va.logits), va.targets,
                                                     trainer._split("val")["source"].astype(str).to_numpy()[va.indices])
    row = {"epoch": epoch, "phase": "head" if frozen else "full", "lr": trainer.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 2), "train_loss": tr.loss, **{f"train_{k}": v for k, v in trm.items()},
           "val_loss": va.loss, **{f"val_{k}": v for k, v in vam.items()}}
    state["history"].append(row)
    state["epoch"] = epoch
    score = next(v for v in (vam.get("auc_within_source"), vam["auc"], vam["acc"]) if v is not None and v == v)
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
    last = checkpoint_dict(model, cfg, data, state, True, trainer.optimizer, trainer.scheduler, trainer.scaler)
    if trainer.adversarial is not None:
        last["adversary"] = {k: v.detach().cpu() for k, v in trainer.adversarial.adversary.state_dict().items()}
    save_checkpoint(run_dir / "last.pt", last)
