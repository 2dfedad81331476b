"""Training configuration: a typed dataclass, its command-line parser, and validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

from covidxr.data.loaders import DataSettings, LoaderSettings
from covidxr.networks.architectures import ARCHS
from covidxr.preprocessing.settings import EQUALIZE, LUNG_MARGIN, LUNG_MASK_DILATION
from covidxr.preprocessing.style_augment import AUGMENT_MODES
from covidxr.training.contrast import LOSSES
from covidxr.utils import OneLineParser, add_device_arg, int_at_least

PROG = "covidxr.train"
BALANCES = ("loss", "sampler", "group", "sqrt", "none")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(DataSettings):
    """Every setting of a training run; saved as config.json and inside each checkpoint.

    The data, split, loader and input settings (``preprocessing``: lung crop and mask, equalisation, augmentation,
    lung model) are :class:`~covidxr.data.loaders.DataSettings`'s; the rest follow. Stored flat
    (:meth:`~covidxr.data.loaders.DataSettings.to_dict`, ``from_dict``), one key per setting as on the command line.
    """

    # model
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | PATH
    # optimisation
    epochs: int = 20
    lr: float = 1e-3  # head learning rate; the backbone gets lr * backbone_lr_scale once unfrozen
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    freeze_epochs: int = 1  # epochs during which only the head trains
    linear_probe: bool = False  # only the head trains, every epoch
    feature_cache: bool = True  # frozen epochs train the head on backbone features computed once (un-augmented)
    patience: int = 5  # early stopping on validation macro ROC-AUC (0: never stop early)
    label_smoothing: float = 0.0
    adversary: float = 0.0  # source adversary's reversed-gradient weight on the backbone (0: off)
    # system
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the network that trains (the saved weights stay un-compiled)
    out: str | None = None  # run folder; default runs/<arch>-<time>
    resume: str | None = None
    split_from: str | None = None  # another run's split.csv (or run folder): train on its patient split
    # input gate (covidxr.model.gate), fitted for best.pt when the run ends
    gate: bool = True
    gate_laterals: str | None = None  # lateral films; default notcxr/lateral beside the data or one folder up

    def loader_settings(self) -> LoaderSettings:
        """The settings that decide the run's data and loaders."""
        return LoaderSettings(**{f.name: getattr(self, f.name) for f in fields(DataSettings)})


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def image_size(text: str) -> int:
    """argparse type: an image side between 32 and 2048 pixels."""
    value = int(text)
    if not 32 <= value <= 2048:
        raise argparse.ArgumentTypeError(f"must be between 32 and 2048, got {value}")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5], got {text}")
    return value


def add_input_args(p: argparse.ArgumentParser, lung_margin: float = LUNG_MARGIN) -> None:
    """Add --lung-crop, --lung-mask, --lung-margin, --lung-mask-dilation, --lung-model and --equalize (training and
    cross-validation share them)."""
    g = p.add_argument_group("input preprocessing (recorded in the checkpoint; prediction does the same)")
    g.add_argument("--lung-crop", action="store_true",
                   help="crop each image to its lungs before the letterbox (needs the lung model: python -m "
                        "covidxr.lungs train; it is then stored in the checkpoint)")
    g.add_argument("--lung-mask", action="store_true",
                   help="crop to the lungs as --lung-crop does, then black out everything outside the (slightly "
                        "widened) lung mask, so that markers, borders, devices and body cannot tell the hospital")
    g.add_argument("--lung-margin", type=_margin, default=lung_margin,
                   help="margin around the lung box, as a share of the image's height and width")
    g.add_argument("--lung-mask-dilation", type=_margin, default=LUNG_MASK_DILATION, metavar="SHARE",
                   help="with --lung-mask: widen the mask by this share of the crop's longer side first")
    g.add_argument("--lung-model", metavar="PATH",
                   help="lung model file (default: $COVIDXR_HOME/lungs/lung-seg.pt, ~/.cache/covidxr/...)")
    g.add_argument("--equalize", choices=EQUALIZE, default="none",
                   help="intensity equalisation after the crop: histogram (hist) or CLAHE (with --lung-mask, from "
                        "the pixels inside the mask alone)")


def add_balance_args(g: argparse._ArgumentGroup, d: Any) -> None:
    """Add --balance, --loss and --epoch-size (training and cross-validation share them); ``d`` holds their defaults
    (a :class:`TrainConfig` or a cross-validation config)."""
    g.add_argument("--balance", choices=BALANCES, default=d.balance,
                   help="imbalance: weighted loss, sampler by class, sampler by (class, source) group "
                        "(weakens source shortcuts), sampler by group with weights growing as the square root of "
                        "the group's size (sqrt), or nothing")
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="softmax: each film against every class; contrast: each film only against the classes its "
                        "own source holds, so no class is learned as a collection's look (single-class sources "
                        "are not drawn; the best epoch is chosen by the within-source validation AUC)")
    g.add_argument("--epoch-size", type=non_negative_int, default=d.epoch_size, metavar="N",
                   help="films drawn per training epoch, with replacement and the --balance weights (0: the whole "
                        "training split once): more data then means more variety, not longer epochs")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Return the ``python -m covidxr.train`` parser (reusable by tests and other entry points)."""
    d = TrainConfig()
    p = OneLineParser(f"python -m {PROG}", add_help=add_help,
                      description="Fine-tune an ImageNet CNN on chest X-rays with a patient-level split.")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="class-per-folder tree or CSV manifest (default: $COVIDXR_DATA, then data/cxr)")
    g.add_argument("--val-frac", type=_fraction, default=d.val_frac, help="share of each class for validation")
    g.add_argument("--test-frac", type=_fraction, default=d.test_frac, help="share of each class for test")
    g.add_argument("--holdout-source", action="append", default=[], metavar="SOURCE",
                   help="put every image of this source in test (repeatable): external validation")
    add_balance_args(g, d)
    g.add_argument("--exclude-source", action="append", default=[], metavar="SOURCE",
                   help="leave out every image of this source (repeatable)")
    g.add_argument("--exclude-where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="leave out images whose manifest COLUMN equals VALUE, e.g. view=L (repeatable)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=d.cache,
                   help="decode each image once into the prepared cache (default: on)")
    g.add_argument("--cache-dir", help="prepared cache folder (default: $COVIDXR_CACHE or ~/.cache/covidxr/prepared)")
    g.add_argument("--strict", action="store_true", help="stop on unreadable images instead of skipping them")
    add_input_args(p, d.preprocessing.lung_margin)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=d.arch, help=f"architecture, e.g. {', '.join(ARCHS)}")
    g.add_argument("--weights", default=d.weights, help="imagenet, none, or a path to a weights file")
    g.add_argument("--img-size", type=image_size, default=d.img_size, help="network input side in pixels")
    g = p.add_argument_group("optimisation")
    # None tells "not given" apart from "given as the default": with --resume only a given --epochs applies.
    g.add_argument("--epochs", type=int_at_least(1), default=None,
                   help=f"training epochs (default {d.epochs}; with --resume the run's own, or this many if more)")
    g.add_argument("-b", "--batch-size", type=int_at_least(1), default=d.batch_size,
                   help="images per batch, per process under torchrun (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=d.lr, help="head learning rate (AdamW)")
    g.add_argument("--backbone-lr-scale", type=_positive_float, default=d.backbone_lr_scale,
                   help="backbone learning rate as a fraction of --lr once unfrozen")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up before cosine decay")
    g.add_argument("--freeze-epochs", type=non_negative_int, default=d.freeze_epochs,
                   help="epochs that train the head only, backbone frozen")
    g.add_argument("--linear-probe", action="store_true",
                   help="train the head only, for every epoch (backbone frozen throughout)")
    g.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=d.feature_cache,
                   help="while the backbone is frozen, compute its features once per image (eval mode, "
                        "un-augmented) and train the head on them (default: on); --no-feature-cache passes "
                        "augmented images through the frozen backbone every epoch")
    g.add_argument("--patience", type=non_negative_int, default=d.patience,
                   help="stop after this many epochs without a better validation macro ROC-AUC (0: never)")
    g.add_argument("--label-smoothing", type=_fraction, default=d.label_smoothing,
                   help="cross-entropy label smoothing (default: %(default)s)")
    g.add_argument("--augment", choices=AUGMENT_MODES, default=d.preprocessing.augment,
                   help="training augmentation: standard (crops, rotations, shifts, brightness, contrast) or style "
                        "(also a random gamma, blur or sharpening, resolution loss and noise per image, so that "
                        "hospitals' image processing is no shortcut)")
    g.add_argument("--adversary", type=_non_negative_float, default=d.adversary, metavar="W",
                   help="train a source adversary (which hospital, given the class) on the pooled features through "
                        "a gradient reversal of weight W, so the backbone unlearns the source while the backbone "
                        "trains (0: off; try 0.1-1)")
    g = p.add_argument_group("system")
    add_device_arg(g)
    g.add_argument("-j", "--workers", type=non_negative_int, default=d.workers, help="data loading processes")
    g.add_argument("--gpu-cache", choices=("auto", "on", "off"), default=d.gpu_cache,
                   help="hold the prepared images on the device as one uint8 tensor and augment whole batches "
                        "there (auto: on CUDA when they take under 4 GB and a quarter of free memory; on: "
                        "also on the CPU)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.amp, help="mixed precision on CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="channels_last memory format on CUDA")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the training network (on one H100, ResNet50 at 224: 1.4x the steps per second "
                        "after a first step of about a minute; see benchmarks/bench_compile.py)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="initialisation, split, sampling and augmentation; each epoch's from (seed, epoch)")
    g.add_argument("--out", metavar="FOLDER", help="run folder (default: runs/<arch>-<date>-<time>)")
    g.add_argument("--resume", help="continue from a run's last.pt")
    g.add_argument("--split-from", metavar="RUN",
                   help="train on another run's patient split (its folder or split.csv) instead of drawing one from "
                        "--seed: members of a seed ensemble (python -m covidxr.ensemble) must share their split")
    g = p.add_argument_group("input gate")
    g.add_argument("--gate", action=argparse.BooleanOptionalAction, default=d.gate,
                   help="when the run ends, fit the input gate of best.pt on the run's own split, as python -m "
                        "covidxr.gate fit does (default: on; --no-gate to skip)")
    g.add_argument("--gate-laterals", metavar="FOLDER",
                   help="lateral chest films for the gate's view check (default: notcxr/lateral beside the data "
                        "or one folder up)")
    return p


def config_from_args(args: argparse.Namespace, resumed: dict | None = None) -> TrainConfig:
    """Turn parsed arguments into a :class:`TrainConfig`.

    Args:
        args: parsed :func:`get_args_parser` arguments.
        resumed: the stored config of the run that ``--resume`` continues. Its settings are kept; a given
            ``--epochs`` raises its epoch count (never lowers it).
    """
    given = {k: v for k, v in vars(args).items() if not (k == "epochs" and v is None)}
    if resumed is None:
        return TrainConfig.from_dict(given)
    cfg = TrainConfig.from_dict({**resumed, "resume": args.resume})
    return cfg if args.epochs is None else replace(cfg, epochs=max(cfg.epochs, args.epochs))
