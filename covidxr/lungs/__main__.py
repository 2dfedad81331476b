"""Command line for the lung model: ``python -m covidxr.lungs {train,check} ...``.

Examples::

    python -m covidxr.lungs train                       # ../shared/data/lungs -> $COVIDXR_HOME/lungs/lung-seg.pt
    python -m covidxr.lungs train --arch unet --img-size 160 --epochs 40 --out runs/unet-160   # its lung-seg.pt
    python -m covidxr.lungs check --all --out runs/lungs-check  # contact sheet, fall-back rates per source

Failures a user can cause print one line ``covidxr.lungs: error: ...`` and exit with status 2
(``covidxr.utils.run_cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from covidxr.errors import CovidxrError
from covidxr.lungs.check import check_sources
from covidxr.lungs.model import LUNG_MODEL_NAME, metrics_path
from covidxr.lungs.net import ARCHS
from covidxr.lungs.train import LungTrainConfig, run
from covidxr.utils import (
    OneLineParser,
    add_checkpoint_arg,
    add_out_arg,
    int_at_least,
    out_file,
    run_cli,
    seed_everything,
    setup_logging,
)

PROG = "covidxr.lungs"
CHECK_SHEET = "lungs-check.png"


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser``."""
    d = LungTrainConfig()
    parser.add_argument("--data", default="",
                        help="folder with images/NAME.jpg and masks/NAME.png (default: $COVIDXR_LUNG_DATA, "
                             "then shared/data/lungs beside the checkout)")
    add_out_arg(parser, f"folder to write {LUNG_MODEL_NAME} into (default: $COVIDXR_HOME/lungs, COVIDXR_HOME "
                        "defaulting to ~/.cache/covidxr, where covidxr finds it)")
    parser.add_argument("--arch", choices=ARCHS, default=d.arch,
                        help="plain U-Net, or U-Net on the ImageNet EfficientNet-Lite0 encoder (default: %(default)s)")
    parser.add_argument("--width", type=int_at_least(4), default=d.width,
                        help="U-Net channels at full resolution (default: %(default)s)")
    parser.add_argument("--img-size", type=int_at_least(32), default=d.img_size,
                        help="network input side in pixels, a multiple of 16 (default: %(default)s)")
    parser.add_argument("--epochs", type=int_at_least(1), default=d.epochs,
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=d.batch_size,
                        help="films per batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, one-cycle (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="initialisation, shuffling and augmentation (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=d.split_seed,
                        help="which films are held out and validated on (default: %(default)s)")
    add_threads_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads``."""
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="torch CPU threads (default: %(default)s: the network is small, and on a shared machine "
                             "two spinning OpenMP threads ran an epoch 4-6x slower than one)")


def add_check_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``check`` options to ``parser``."""
    add_checkpoint_arg(parser, "lung model (default: $COVIDXR_HOME/lungs/lung-seg.pt)", required=False,
                       old_name="--model")
    parser.add_argument("--data-root", default="",
                        help="folder holding all.csv and external/ (default: shared/data beside the checkout)")
    add_out_arg(parser, f"folder for {CHECK_SHEET} and its .json (default: %(default)s)", Path("lungs-check"))
    parser.add_argument("--per-source", type=int_at_least(1), default=6,
                        help="films per source on the sheet (default: %(default)s)")
    parser.add_argument("--all", action="store_true",
                        help="compute fall-back rates over every film of every source (default: the sheet's films)")
    parser.add_argument("--seed", type=int, default=0, help="which films are drawn (default: %(default)s)")
    add_threads_arg(parser)
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.lungs``."""
    parser = OneLineParser(prog=f"python -m {PROG}", description="Lung segmentation model: train it, check it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_args(commands.add_parser("train", help="train the lung model and save it where covidxr finds it"))
    add_check_args(commands.add_parser("check", help="contact sheet of predicted masks and fall-back rates"))
    return parser


def config_from_args(args: argparse.Namespace) -> LungTrainConfig:
    """Return the training config of parsed ``train`` arguments."""
    try:
        out = str(out_file(args.out, LUNG_MODEL_NAME, PROG)) if args.out else ""
        return LungTrainConfig(data=args.data, out=out, arch=args.arch, width=args.width, img_size=args.img_size,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           split_seed=args.split_seed, progress=not args.no_progress)
    except ValueError as exc:
        raise CovidxrError(str(exc)) from exc


def run_train(args: argparse.Namespace) -> None:
    """Train and print the held-out Dice summary."""
    cfg = config_from_args(args)
    seed_everything(cfg.seed)
    metrics = run(cfg)
    held = metrics["held_out_dice"]
    print(f"held-out Dice mean {held['mean']:.4f} min {held['min']:.4f} (n={held['n']}), best epoch "
          f"{metrics['best_epoch']}, {metrics['train_seconds']:.0f} s; saved {cfg.checkpoint_path} and "
          f"{metrics_path(cfg.checkpoint_path).name}")


def run_check(args: argparse.Namespace) -> None:
    """Write the contact sheet and print the fall-back rates per source."""
    sheet = out_file(args.out, CHECK_SHEET, PROG)
    checkpoint = str(args.checkpoint) if args.checkpoint else None
    report = check_sources(checkpoint, args.data_root or None, sheet, args.per_source, args.all, args.seed)
    print(json.dumps(report["fallback"], indent=2))
    print(f"contact sheet: {sheet}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""

    def lungs(args: argparse.Namespace) -> None:
        setup_logging()
        torch.set_num_threads(args.threads)
        (run_train if args.command == "train" else run_check)(args)

    return run_cli(get_args_parser(), lungs, argv)


if __name__ == "__main__":
    sys.exit(main())
