"""What a training run writes: the self-describing checkpoint dict, history.csv, config.json, split.csv and
unreadable.csv (rank 0 only)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from covidxr.data.loaders import RunData
from covidxr.data.split import save_split
from covidxr.files import atomic_write_text
from covidxr.networks.architectures import XrayClassifier, preprocess_for
from covidxr.training.config import TrainConfig
from covidxr.training.distributed import DistInfo
from covidxr.utils import library_versions

log = logging.getLogger("covidxr.train")
HISTORY_FIELDS = ("epoch", "phase", "lr", "seconds", "train_loss", "train_acc", "train_f1", "train_auc",
                  "val_loss", "val_acc", "val_f1", "val_auc", "val_auc_within_source")


def checkpoint_dict(model: XrayClassifier, cfg: TrainConfig, data: RunData, state: dict, full: bool,
                    optimizer=None, scheduler=None, scaler=None) -> dict:
    """Assemble the self-describing checkpoint (optimizer/scheduler/scaler/RNG state only when ``full``)."""
    ckpt = {
        "arch": model.arch,
        "classes": list(data.classes),
        "preprocess": data.pipeline.record(preprocess_for(model, cfg.img_size)).to_dict(),
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
        **data.pipeline.checkpoint_entries(),  # the lung model, with a lung crop
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


def _csv_cell(text: str) -> str:
    return '"' + str(text).replace('"', '""') + '"' if any(c in str(text) for c in ',"\n') else str(text)
