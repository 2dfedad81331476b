"""Training the lung model: data, a seeded split that holds masks out, augmentation, the loop, and Dice.

Films and masks are decoded once (``covidxr.images.reader.load_xray`` for the films), letterboxed to the network size
and kept in memory: 175 films at 128 px are about 11 MB, so an epoch is only the network's work.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from covidxr.errors import DatasetError
from covidxr.files import atomic_write_text
from covidxr.images.reader import load_xray
from covidxr.lungs.model import LungModel, default_lung_model_path, metrics_path, save_lung_checkpoint
from covidxr.lungs.net import ARCHS, LITE0_UNET, UNET, build_net
from covidxr.preprocessing.transforms import letterbox
from covidxr.utils import library_versions

log = logging.getLogger(__name__)

DATA_ENV_VAR = "COVIDXR_LUNG_DATA"


def default_lung_data() -> Path:
    """Return ``$COVIDXR_LUNG_DATA``, else ``shared/data/lungs`` beside the checkout (where the tests find data)."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "lungs"


@dataclass(frozen=True)
class LungAugmentRanges:
    """Light augmentation, drawn per film; image and mask get the same geometry."""

    degrees: float = 8.0  # rotation up to +/- this
    zoom: tuple[float, float] = (0.85, 1.15)  # < 1 zooms out: films from other sites show more of the body
    translate: float = 0.06  # shift up to +/- this share of the side
    stretch: float = 0.08  # aspect ratio in 1 +/- this
    contrast: float = 0.2  # factor in 1 +/- this
    brightness: float = 0.1  # shift up to +/- this
    gamma: float = 0.25  # exponent in exp(+/- this)


@dataclass(frozen=True)
class LungTrainConfig:
    """Everything a lung training run depends on; stored in the checkpoint."""

    data: str = ""  # folder with images/ and masks/; "" means default_lung_data()
    out: str = ""  # checkpoint path; "" means default_lung_model_path()
    # Measured on this data (held-out Dice, fall-back rate of lung_box on the other sources, CPU time): the Lite0
    # U-Net at 128 px matched the plain U-Net's Dice, trained faster, and segmented films of other sites better.
    arch: str = LITE0_UNET
    width: int = 12  # plain U-Net only: channels at full resolution
    img_size: int = 128
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0  # initialisation, shuffling and augmentation
    split_seed: int = 0  # which films are held out and validated on (kept fixed across --seed)
    test_frac: float = 0.2
    val_frac: float = 0.15  # of the films left after the hold-out: picks the best epoch
    progress: bool = True
    augment: LungAugmentRanges = field(default_factory=LungAugmentRanges)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.img_size < 32 or self.img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16 and at least 32, got {self.img_size}")
        if not (0 < self.test_frac < 1 and 0 < self.val_frac < 1):
            raise ValueError("test_frac and val_frac must lie in (0, 1)")

    @property
    def arch_record(self) -> dict[str, Any]:
        return {"name": UNET, "width": self.width, "depth": 4} if self.arch == UNET else {"name": LITE0_UNET}

    @property
    def data_path(self) -> Path:
        return Path(self.data).expanduser() if self.data else default_lung_data()

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out).expanduser() if self.out else default_lung_model_path()


@dataclass
class LungData:
    """Decoded films (float32 (H, W) in [0, 1]) and masks (bool (H, W)) by name."""

    names: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    def subset(self, names: list[str]) -> LungData:
        index = {name: i for i, name in enumerate(self.names)}
        return LungData(names, [self.images[index[n]] for n in names], [self.masks[index[n]] for n in names])


def load_lung_data(folder: str | Path, limit: int | None = None) -> LungData:
    """Read ``folder/images/NAME.jpg`` and ``folder/masks/NAME.png`` (255 = lung), sorted by name.

    Raises:
        DatasetError: the folder, its images/ or masks/ is missing, holds no pairs, or a mask does not fit its film.
    """
    folder = Path(folder).expanduser()
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DatasetError(f"no lung data at {folder}: expected images/NAME.jpg and masks/NAME.png (255 = lung)")
    masks_by_name = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    films = sorted(p for p in images_dir.iterdir() if p.stem in masks_by_name and not p.name.startswith("."))
    if not films:
        raise DatasetError(f"no lung data at {folder}: no film in images/ has a mask of the same name in masks/")
    films = films[:limit] if limit else films
    data = LungData([], [], [])
    for film in tqdm(films, desc="read lung films", leave=False, disable=None):
        image = load_xray(film).pixels
        with Image.open(masks_by_name[film.stem]) as handle:
            mask = np.asarray(handle.convert("L")) >= 128
        if mask.shape != image.shape:
            raise DatasetError(f"{film.name}: mask is {mask.shape[::-1]} pixels, the film {image.shape[::-1]}")
        data.names.append(film.stem)
        data.images.append(image)
        data.masks.append(mask)
    return data


def split_names(names: list[str], seed: int, test_frac: float, val_frac: float) -> dict[str, list[str]]:
    """Return a seeded split of ``names`` into ``train``, ``val`` and ``held_out`` (one film per patient here).

    The hold-out is ``round(test_frac * n)`` films (at least one), validation ``round(val_frac * rest)`` of the rest.
    """
    order = sorted(names)
    rng = np.random.default_rng(seed)
    shuffled = [order[i] for i in rng.permutation(len(order))]
    n_test = max(1, round(test_frac * len(order)))
    n_val = max(1, round(val_frac * (len(order) - n_test)))
    if len(order) - n_test - n_val < 1:
        raise DatasetError(f"{len(order)} films are too few to hold out {n_test} and validate on {n_val}")
    return {"train": sorted(shuffled[n_test + n_val :]), "val": sorted(shuffled[n_test : n_test + n_val]),
            "held_out": sorted(shuffled[:n_test])}


def to_tensors(data: LungData, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterbox films and masks: (N, 1, S, S) float images in [0, 1] and (N, 1, S, S) soft masks in [0, 1]."""
    images = torch.stack([letterbox(image, img_size) for image in data.images])
    masks = torch.stack([letterbox(mask.astype(np.float32), img_size) for mask in data.masks])
    return images, masks


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
            ranges: LungAugmentRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random affine map per film to film and mask, then contrast, brightness and gamma to the film."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-ranges.degrees, ranges.degrees).deg2rad()
    zoom = uniform(*ranges.zoom)
    stretch = uniform(1 - ranges.stretch, 1 + ranges.stretch)
    sx, sy = 1 / (zoom * stretch.sqrt()), stretch.sqrt() / zoom  # output -> source scale per axis
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, uniform(-2, 2) * ranges.translate], -1),
                         torch.stack([sy * sin, sy * cos, uniform(-2, 2) * ranges.translate], -1)], -2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(1 - ranges.contrast, 1 + ranges.contrast).view(n, 1, 1, 1)
    shift = uniform(-ranges.brightness, ranges.brightness).view(n, 1, 1, 1)
    gamma = uniform(-ranges.gamma, ranges.gamma).exp().view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean + shift).clamp(0.0, 1.0).pow(gamma)
    return images, masks


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss (Dice keeps the small lung borders weighted against the background)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks, 2|A and B| / (|A| + |B|); 1.0 when both are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def train_one_epoch(net: nn.Module, images: torch.Tensor, masks: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, batch_size: int, generator: torch.Generator,
                    ranges: LungAugmentRanges) -> float:
    """Run one epoch over the (augmented) training tensors; return the mean loss."""
    net.train()
    order = torch.randperm(images.shape[0], generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if len(index) < 2:  # batch norm needs two samples
            continue
        x, y = augment(images[index], masks[index], generator, ranges)
        loss = segmentation_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
        seen += len(index)
    return total / max(seen, 1)


def net_dice(net: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Per-film Dice at the network's size (masks thresholded at 0.5), in eval mode; restores the net's mode."""
    was_training = net.training
    net.eval()
    scores = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            pred = net(images[start : start + batch_size]) > 0
            truth = masks[start : start + batch_size] >= 0.5
            scores.extend(dice(p.numpy(), t.numpy()) for p, t in zip(pred, truth, strict=True))
    net.train(was_training)
    return np.asarray(scores)


def held_out_dice(model: LungModel, data: LungData) -> dict[str, float]:
    """Dice of each held-out film at its original size, through :meth:`LungModel.masks` (the path users take)."""
    predicted = model.masks(data.images)
    return {name: dice(p, t) for name, p, t in zip(data.names, predicted, data.masks, strict=True)}


def fit(cfg: LungTrainConfig, train: LungData, val: LungData) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a network on ``train``; return it at the epoch with the best validation Dice, and the history."""
    with torch.random.fork_rng(devices=[]):  # seeds the initialisation without touching the caller's generator
        torch.manual_seed(cfg.seed)
        net = build_net(cfg.arch_record, pretrained=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = to_tensors(train, cfg.img_size)
    x_val, y_val = to_tensors(val, cfg.img_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * sum(1 for s in range(0, len(train.names), cfg.batch_size) if len(train.names) - s >= 2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(steps, 1),
                                                    pct_start=0.15)
    best_state, best_dice, history = copy.deepcopy(net.state_dict()), -math.inf, []
    bar = tqdm(range(1, cfg.epochs + 1), desc="train lungs", disable=None if cfg.progress else True)
    for epoch in bar:
        start = time.perf_counter()
        loss = train_one_epoch(net, x_train, y_train, optimizer, scheduler, cfg.batch_size, generator, cfg.augment)
        val_dice = float(net_dice(net, x_val, y_val).mean())
        history.append({"epoch": epoch, "loss": round(loss, 5), "val_dice": round(val_dice, 5),
                        "seconds": round(time.perf_counter() - start, 2)})
        if val_dice > best_dice:
            best_state, best_dice = copy.deepcopy(net.state_dict()), val_dice
        bar.set_postfix(loss=f"{loss:.3f}", val_dice=f"{val_dice:.3f}", best=f"{best_dice:.3f}")
        if not cfg.progress:
            log.info("epoch %d/%d: loss %.4f, val Dice %.4f (best %.4f), %.1f s", epoch, cfg.epochs, loss, val_dice,
                     best_dice, history[-1]["seconds"])
    net.load_state_dict(best_state)
    return net.eval(), history


def summary(scores: dict[str, float]) -> dict[str, Any]:
    """Mean, min, median and the worst films of per-film Dice scores."""
    values = np.asarray(list(scores.values()))
    worst = sorted(scores, key=scores.get)[:3]
    return {"mean": round(float(values.mean()), 4), "min": round(float(values.min()), 4),
            "median": round(float(np.median(values)), 4), "n": len(values),
            "worst": {name: round(scores[name], 4) for name in worst}}


def run(cfg: LungTrainConfig, limit: int | None = None) -> dict[str, Any]:
    """Train, pick the best epoch on validation, measure Dice on the held-out films, and save the checkpoint and
    its metrics JSON; return the metrics. ``limit`` reads only the first films (tests)."""
    started = time.perf_counter()
    data = load_lung_data(cfg.data_path, limit)
    split = split_names(data.names, cfg.split_seed, cfg.test_frac, cfg.val_frac)
    log.info("lung films: %d train, %d val, %d held out", *(len(split[k]) for k in ("train", "val", "held_out")))
    net, history = fit(cfg, data.subset(split["train"]), data.subset(split["val"]))
    best = max(history, key=lambda row: row["val_dice"])
    train_seconds = time.perf_counter() - started
    ckpt = {"arch": cfg.arch_record, "img_size": cfg.img_size, "threshold": 0.5, "model": net.state_dict(),
            "preprocess": {"reader": "covidxr.images.reader.load_xray", "geometry": "letterbox",
                           "img_size": cfg.img_size,
                           "input": "grey float in [0, 1]", "normalisation": "inside the network"}}
    model = LungModel.from_checkpoint(ckpt, "trained model")
    held = held_out_dice(model, data.subset(split["held_out"]))
    metrics = {"held_out_dice": summary(held), "held_out_per_film": {k: round(v, 4) for k, v in held.items()},
               "best_epoch": best["epoch"], "val_dice_at_best": best["val_dice"],
               "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
               "history": history}
    config = {**asdict(cfg), "data": str(cfg.data_path), "out": str(cfg.checkpoint_path)}
    ckpt.update({"metrics": metrics, "split": {"seed": cfg.split_seed, **split}, "config": config,
                 "versions": library_versions()})
    save_lung_checkpoint(cfg.checkpoint_path, ckpt)
    report = {"checkpoint": str(cfg.checkpoint_path), **metrics, "split": ckpt["split"], "config": config}
    atomic_write_text(metrics_path(cfg.checkpoint_path), json.dumps(report, indent=2) + "\n")
    return metrics
