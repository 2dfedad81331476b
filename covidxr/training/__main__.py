"""``python -m covidxr.train``: fine-tune a pretrained CNN on chest X-rays, split by patient.

Run folder: best.pt, last.pt, config.json, history.csv, split.csv (and unreadable.csv when files were skipped).

Speed (see also ``python -m covidxr.prepare`` and ``python -m covidxr.bench``):

* Images are decoded once into the prepared cache (``--no-cache`` decodes them every epoch instead).
* ``--gpu-cache auto|on|off``: small datasets live on the GPU as one uint8 tensor and whole batches are
  augmented there (:class:`covidxr.data.dataset.DeviceBatches`); ``on`` also works on the CPU.
* While the backbone is frozen (``--freeze-epochs``, ``--linear-probe``) the head trains on backbone features
  computed once per image, in eval mode and without augmentation (:mod:`covidxr.training.head_features`;
  ``--no-feature-cache`` to pass augmented images through the frozen backbone every epoch instead).
* ``torchrun --nproc_per_node=N -m covidxr.train ...`` trains with DistributedDataParallel (NCCL on CUDA, Gloo
  on the CPU). ``--batch-size`` is per process. Rank 0 prepares the cache and splits while the others wait,
  and alone logs and writes the run folder; metrics cover every rank's predictions, each sample once. With
  ``--balance sampler/group`` every rank draws the same weighted sample of the epoch and keeps its own share
  of it, so the ranks together see what one process would. The checkpoint holds the unwrapped model;
  ``--resume`` works under torchrun as without it.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

from covidxr.model.checkpoint import load_checkpoint
from covidxr.model.input_pipeline import require_lung_model
from covidxr.training import distributed
from covidxr.training.config import config_from_args, get_args_parser
from covidxr.training.trainer import run
from covidxr.utils import run_cli, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    parser = get_args_parser()

    def train(args: argparse.Namespace) -> None:
        setup_logging()
        if not distributed.env_info().is_main:
            logging.getLogger().setLevel(logging.ERROR)  # under torchrun only rank 0 reports
        resume = load_checkpoint(args.resume) if args.resume else None
        cfg = config_from_args(args, resume["config"] if resume is not None else None)
        if cfg.val_frac + cfg.test_frac >= 1:
            parser.error("--val-frac plus --test-frac must leave images for training")
        if cfg.preprocessing.lung_crop and resume is None:
            require_lung_model(cfg.preprocessing.lung_model)
        run(cfg, resume)

    return run_cli(parser, train, argv, interrupted="interrupted; continue with --resume RUN/last.pt")


if __name__ == "__main__":
    sys.exit(main())
