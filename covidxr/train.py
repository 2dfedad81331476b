"""``python -m covidxr.train``: fine-tune a pretrained CNN on chest X-rays, split by patient.

Run folder: best.pt, last.pt, config.json, history.csv, split.csv (and unreadable.csv when files were skipped).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from covidxr import engine
from covidxr.checkpoint import atomic_write_text, load_checkpoint, remove_stale_temporaries, save_checkpoint
from covidxr.config import TrainConfig, config_from_args, get_args_parser
from covidxr.data.audit import confounding_warnings
from covidxr.data.cache import default_cache_dir, prepare
from covidxr.data.dataset import XrayDataset
from covidxr.data.manifest import class_names, dataset_root, load_manifest, resolve_data_path, validate_for_training
from covidxr.data.split import apply_split, check_no_leakage, make_split, save_split
from covidxr.errors import CovidxrError, DatasetError
from covidxr.models import XrayClassifier, build_model, model_from_checkpoint, preprocess_for
from covidxr.preprocess import cache_size, eval_transform, train_transform
from covidxr.utils import amp_dtype, autocast, library_versions, pick_device, seed_everything, setup_logging

log = logging.getLogger("covidxr.train")
HISTORY_FIELDS = ("epoch", "phase", "lr", "seconds", "train_loss", "train_acc", "train_f1", "train_auc",
                  "val_loss", "val_acc", "val_f1", "val_auc")


@dataclass
class RunData:
    """The dataset of a run after splitting and dropping unreadable files."""

    table: pd.DataFrame  # manifest rows with a split column
    classes: list[str]
    root: Path
    images: list[np.ndarray] | None  # prepared squares aligned with table rows, or None without the cache
    unreadable: dict[str, str]  # relpath -> reason


def load_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool) -> RunData:
    """Resolve, split (or reload the run's split) and prepare the dataset; refuse unusable data early."""
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
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    prepared = prepare(table["path"].tolist(), cache_size(cfg.img_size), cache_dir if cfg.cache else None,
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


def make_loaders(data: RunData, cfg: TrainConfig, device: torch.device, epoch_seed: int) -> dict[str, DataLoader]:
    """Return train/val/test loaders; the train loader's order and augmentations follow ``epoch_seed``."""
    index = {c: i for i, c in enumerate(data.classes)}
    loaders = {}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero((data.table["split"] == split).to_numpy())
        if len(rows) == 0:
            continue
        sub = data.table.iloc[rows]
        transform = train_transform(cfg.img_size) if split == "train" else eval_transform(cfg.img_size)
        ds = XrayDataset(sub["path"].tolist(), [index[c] for c in sub["label"]], cache_size(cfg.img_size),
                         transform, [data.images[i] for i in rows] if data.images is not None else None)
        generator = torch.Generator().manual_seed(epoch_seed)
        sampler = None
        if split == "train" and cfg.balance in ("sampler", "group"):
            weights = sample_weights(sub, cfg.balance)
            sampler = WeightedRandomSampler(weights.tolist(), len(ds), replacement=True, generator=generator)
        loaders[split] = DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=split == "train" and sampler is None, sampler=sampler,
            num_workers=cfg.workers, pin_memory=device.type == "cuda", generator=generator,
            drop_last=split == "train" and len(ds) > cfg.batch_size, persistent_workers=False)
    return loaders


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
    ])
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
    """Train according to ``cfg`` and return the run folder."""
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        epochs = cfg.epochs
        cfg = TrainConfig.from_dict({**resume["config"], "resume": cfg.resume})
        cfg.epochs = max(cfg.epochs, epochs) if epochs != TrainConfig.epochs else cfg.epochs
        run_dir = Path(cfg.resume).resolve().parent
    else:
        run_dir = Path(cfg.out or f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # left by a run killed while saving
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = amp_dtype(device) if cfg.amp else None
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = load_run_data(cfg, run_dir, resuming=resume is not None)
    if resume is not None and resume["classes"] != data.classes:
        raise DatasetError(f"dataset classes {data.classes} differ from the checkpoint's {resume['classes']}")
    save_split(data.table, run_dir / "split.csv")
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    if data.unreadable:
        atomic_write_text(run_dir / "unreadable.csv", "relpath,reason\n" + "".join(
            f"{_csv_cell(k)},{_csv_cell(v)}\n" for k, v in data.unreadable.items()))
        log.warning("skipped %d unreadable image(s), listed in %s", len(data.unreadable), run_dir / "unreadable.csv")
    counts = data.table.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("data %s: %d images, classes %s\n%s", data.root, len(data.table), data.classes, counts.to_string())

    model = model_from_checkpoint(resume, cfg.resume) if resume is not None else build_model(
        cfg.arch, len(data.classes), cfg.weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_targets = np.array([data.classes.index(c) for c in data.table.loc[data.table["split"] == "train", "label"]])
    weight = class_weights(train_targets, len(data.classes)).to(device) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss(weight=weight)
    steps = len(make_loaders(data, cfg, device, cfg.seed)["train"])
    optimizer, scheduler = build_optimizer(model, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = {"history": [], "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "epochs_since_best": 0}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log.info("resuming %s after epoch %d", cfg.resume, state["epoch"])
    amp = autocast(device, dtype)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.patience and state["epochs_since_best"] >= cfg.patience:
            log.info("early stop: no better validation macro ROC-AUC for %d epochs", cfg.patience)
            break
        # Every epoch's randomness derives from (seed, epoch), so a resumed run repeats an uninterrupted one.
        epoch_seed = cfg.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        loaders = make_loaders(data, cfg, device, epoch_seed)
        frozen = epoch <= cfg.freeze_epochs
        set_backbone_frozen(model, frozen)
        start = time.perf_counter()
        tr = engine.train_one_epoch(model, loaders["train"], criterion, optimizer, scheduler, scaler, device, amp,
                                    desc=f"epoch {epoch}/{cfg.epochs}", channels_last=channels_last,
                                    frozen_backbone=frozen)
        va = engine.predict_loader(model, loaders["val"], device, amp, eval_criterion, desc="validate",
                                   channels_last=channels_last)
        seconds = time.perf_counter() - start
        trm = engine.summary_metrics(tr.logits, tr.targets, len(data.classes))
        vam = engine.summary_metrics(va.logits, va.targets, len(data.classes))
        row = {"epoch": epoch, "phase": "head" if frozen else "full", "lr": optimizer.param_groups[0]["lr"],
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
        tqdm.write(f"epoch {epoch:3d} [{row['phase']}] {seconds:6.1f}s | train loss {tr.loss:.4f} "
                   f"acc {fmt(trm['acc'])} f1 {fmt(trm['f1'])} auc {fmt(trm['auc'])} | val loss {va.loss:.4f} "
                   f"acc {fmt(vam['acc'])} "
                   f"f1 {fmt(vam['f1'])} auc {fmt(vam['auc'])}{'  *best*' if improved else ''}", file=sys.stderr)
        write_history(run_dir / "history.csv", state["history"])
        if improved:
            save_checkpoint(run_dir / "best.pt", checkpoint_dict(model, cfg, data, state, full=False))
        save_checkpoint(run_dir / "last.pt",
                        checkpoint_dict(model, cfg, data, state, True, optimizer, scheduler, scaler))
    summary = (f"done: best validation macro ROC-AUC {state['best_auc']:.3f} at epoch {state['best_epoch']}; "
               f"run folder {run_dir}")
    if data.unreadable:
        summary += f"; {len(data.unreadable)} unreadable image(s) skipped (unreadable.csv)"
    log.info(summary)
    return run_dir


def _csv_cell(text: str) -> str:
    return '"' + str(text).replace('"', '""') + '"' if any(c in str(text) for c in ',"\n') else str(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    setup_logging()
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
