"""``python -m covidxr.crossval``: how the classifier does on a hospital it never saw, one source at a time.

Usage::

    python -m covidxr.crossval --by source --data ../shared/data/all.csv --out runs/lite0/crossval
    python -m covidxr.crossval --by source --data ../shared/data/all.csv --mode finetune --epochs 10   # on a GPU

For each source with at least ``--min-images`` images, the model is trained without it (a patient-level train/val
split of the other sources, as ``python -m covidxr.train`` makes it with ``--test-frac 0 --holdout-source SOURCE``)
and tested on it. ``--mode probe`` (default, fit for a CPU) computes the ImageNet backbone's features of every image
once and trains a linear head per fold with the ``--linear-probe`` training loop; ``--mode finetune`` trains the
whole network per fold.

Output folder: ``crossval.json``, ``crossval.csv``, ``crossval.md`` (per held-out source: images, patients, recall
per class present, balanced accuracy, macro ROC-AUC with patient-bootstrap 95% intervals, metadata-only baselines),
``split-<source>.csv`` per fold (relpath, split, ...) and ``fold-<source>/`` (the fold's run folder).
``python -m covidxr.evaluate`` reports ``crossval/crossval.json`` beside a checkpoint (or ``--crossval PATH``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from covidxr.crossval.folds import (
    MODES,
    CrossvalConfig,
    backbone_features,
    classes_missing_elsewhere,
    held_out_sources,
    load_all,
    train_fold,
)
from covidxr.crossval.results import fold_result, write_heldout_logits, write_outputs, write_split
from covidxr.errors import DatasetError
from covidxr.html_page import format_value
from covidxr.model.input_pipeline import require_lung_model
from covidxr.networks.architectures import ARCHS
from covidxr.training.config import add_balance_args, add_input_args, image_size
from covidxr.utils import OneLineParser, add_device_arg, add_out_arg, int_at_least, pick_device, run_cli, setup_logging

PROG = "covidxr.crossval"


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.crossval`` parser."""
    d = CrossvalConfig(data="", out=Path())
    p = OneLineParser(f"python -m {PROG}", description="Cross-validation by source: train without each source "
                      "and test on it (per-class recall, balanced accuracy, macro ROC-AUC with patient-bootstrap "
                      "intervals, metadata-only baselines).")
    p.add_argument("--by", choices=("source",), required=True, help="what to hold out: each value of this column")
    p.add_argument("--data", required=True, help="CSV manifest or folder with a source column")
    add_out_arg(p, "output folder (default: runs/crossval-<arch>-<date>-<time>)")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="probe: linear head on ImageNet features computed once (CPU); finetune: full training per fold")
    p.add_argument("--arch", default=d.arch, help=f"architecture, e.g. {', '.join(ARCHS)}")
    p.add_argument("--weights", default=d.weights, help="imagenet, none, or a path to a weights file")
    p.add_argument("--img-size", type=image_size, default=d.img_size, help="network input side in pixels")
    p.add_argument("--min-images", type=int_at_least(1), default=d.min_images,
                   help="hold out only sources with at least this many readable images")
    p.add_argument("--epochs", type=int_at_least(1), default=d.epochs, help="training epochs per fold")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=d.batch_size,
                   help="images per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="split, training and bootstrap seed")
    p.add_argument("--bootstrap", type=int_at_least(0), default=d.bootstrap, metavar="N",
                   help="patient-level bootstrap resamples for the intervals (0: none)")
    add_device_arg(p)
    p.add_argument("-j", "--workers", type=int_at_least(0), default=min(2, os.cpu_count() or 1),
                   help="decoding and loader processes (default: %(default)s)")
    p.add_argument("--cache-dir", help="prepared cache folder (default: $COVIDXR_CACHE or ~/.cache/covidxr/prepared)")
    p.add_argument("--fold", action="append", default=[], metavar="SOURCE",
                   help="hold out only this source (repeatable; default: every source with --min-images images)")
    add_balance_args(p, d)
    add_input_args(p)
    return p


def cross_validate(cfg: CrossvalConfig) -> dict:
    """Run every fold and write the outputs; return the crossval.json content.

    Raises:
        CovidxrError: Unusable data or settings (one-line message).
    """
    start = time.perf_counter()
    device = pick_device(cfg.device)
    data = load_all(cfg)
    sources, skipped = held_out_sources(data, cfg.min_images)
    if cfg.fold:
        unknown = sorted(set(cfg.fold) - set(sources))
        if unknown:
            raise DatasetError(f"--fold {unknown[0]!r}: not a source with {cfg.min_images}+ readable images "
                               f"(sources: {', '.join(sources)})")
        sources = [s for s in sources if s in cfg.fold]
    if not sources or data.table["source"].nunique() < 2:
        raise DatasetError(f"{cfg.data}: cross-validation by source needs two sources or more, one with "
                           f"{cfg.min_images}+ images (found {dict(data.table['source'].value_counts())})")
    for source in sources:
        missing = classes_missing_elsewhere(data.table, source)
        print(f"fold {source}: " + (f"not valid (no other source has {', '.join(missing)})" if missing else "valid"),
              file=sys.stderr)
    cfg.out.mkdir(parents=True, exist_ok=True)
    feature_set = backbone_features(data, cfg, device) if cfg.mode == "probe" else None
    folds = []
    for source in sources:
        fold_start = time.perf_counter()
        split, logits, best = train_fold(data, source, cfg, feature_set, device)
        write_split(cfg.out, source, split)
        folds.append({**fold_result(source, split, logits, data.classes, cfg, best),
                      "logits_csv": write_heldout_logits(cfg.out, source, split, logits, data.classes),
                      "seconds": round(time.perf_counter() - fold_start, 1)})
    content = {"by": cfg.by, "data": str(cfg.data), "mode": cfg.mode, "arch": cfg.arch, "weights": cfg.weights,
               "img_size": cfg.img_size, "min_images": cfg.min_images, "val_frac": cfg.val_frac, "epochs": cfg.epochs,
               "seed": cfg.seed, "bootstrap": cfg.bootstrap, "classes": data.classes,
               **cfg.preprocessing.input_record(), "balance": cfg.balance, "loss": cfg.loss,
               "epoch_size": cfg.epoch_size,
               "n_images": int(len(data.table)), "unreadable": data.unreadable, "skipped_sources": skipped,
               "folds": folds, "command": cfg.command, "command_line": shlex.join(cfg.command),
               "device": str(device), "seconds": round(time.perf_counter() - start, 1),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_outputs(cfg.out, content)
    return content


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def crossval(args: argparse.Namespace) -> None:
        setup_logging()
        out = args.out or Path("runs") / f"crossval-{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = CrossvalConfig.from_dict({**vars(args), "out": out.expanduser().resolve(),
                                        "command": ["python", "-m", PROG, *argv]})
        if cfg.preprocessing.lung_crop:
            require_lung_model(cfg.preprocessing.lung_model)
        content = cross_validate(cfg)
        for fold in content["folds"]:
            ci = (fold["ci"] or {}).get("metrics", {})
            numbers = ", ".join(f"{k} {format_value(ci.get(k) or fold['metrics'].get(k))}"
                                for k in ("balanced_accuracy", "roc_auc_macro"))
            print(f"held out {fold['name']}: {fold['n_images']} images; {numbers}")
        print(f"table: {cfg.out / 'crossval.md'}")

    return run_cli(get_args_parser(), crossval, argv)


if __name__ == "__main__":
    sys.exit(main())
