"""``python -m covidxr.prepare``: decode every image of a dataset once into the prepared cache, ahead of training.

Training and evaluation fill and use the same cache on their own (``--no-cache`` turns it off); running this
first moves the one-off decoding out of the first run, in several processes, with a progress bar. Entries are
keyed by file path, size, modification time, cache side and reader version (see ``covidxr.data.cache``), so a
changed file or reader is decoded again and an unchanged one never is.

The input flags are training's (``--lung-crop``, ``--lung-mask``, ``--lung-margin``, ``--lung-mask-dilation``,
``--lung-model``, ``--equalize``): the cache is filled for the input pipeline a run with the same flags reads.
Exit status (``covidxr.utils.run_cli``): 0 done, 1 done but some images were unreadable, 2 a dataset problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from covidxr.data.cache import default_cache_dir, fill_cache
from covidxr.data.loaders import LoaderSettings, input_pipeline
from covidxr.data.manifest import load_manifest, resolve_data_path
from covidxr.preprocessing.settings import InputSettings
from covidxr.preprocessing.transforms import cache_size
from covidxr.training.config import add_input_args, image_size, non_negative_int
from covidxr.utils import EXIT_DONE, EXIT_SOME_FAILED, OneLineParser, run_cli, setup_logging


def get_args_parser() -> OneLineParser:
    """Return the ``python -m covidxr.prepare`` parser."""
    p = OneLineParser("python -m covidxr.prepare", description="Decode a dataset once into the prepared-image cache.")
    p.add_argument("--data", help="class-per-folder tree or CSV manifest (default: $COVIDXR_DATA, then data/cxr)")
    p.add_argument("--img-size", type=image_size, default=224,
                   help="network input side the cache is for (squares are stored a little larger, 256 for 224)")
    p.add_argument("--cache-dir", help="cache folder (default: $COVIDXR_CACHE or ~/.cache/covidxr/prepared)")
    p.add_argument("-j", "--workers", type=non_negative_int, default=os.cpu_count() or 1,
                   help="decoding processes (0: in this process)")
    add_input_args(p)
    return p


def prepare(args: argparse.Namespace) -> int:
    """Fill the cache for ``args``; return ``EXIT_SOME_FAILED`` when some images were unreadable."""
    setup_logging()
    settings = LoaderSettings(cache_dir=args.cache_dir, preprocessing=InputSettings.from_dict(vars(args)))
    pipeline = input_pipeline(settings)  # a lung crop reads the lung model first: no model, no decoding
    data_path = resolve_data_path(args.data)
    table = load_manifest(data_path)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    size = cache_size(args.img_size)
    start = time.perf_counter()
    filled = fill_cache(table["path"].tolist(), size, cache_dir, workers=args.workers, desc="prepare",
                        pipeline=pipeline, keep_images=False)
    seconds = time.perf_counter() - start
    decoded = len(table) - filled.reused - len(filled.failures)
    variant = f" ({pipeline.key})" if pipeline.key else ""
    print(f"{len(table)} images of {data_path} at {size}x{size}{variant} in {cache_dir}: {decoded} decoded, "
          f"{filled.reused} already prepared, {len(filled.failures)} unreadable ({seconds:.1f}s)")
    for index, reason in list(filled.failures.items())[:10]:
        print(f"  unreadable: {table['relpath'].iloc[index]}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if filled.failures else EXIT_DONE


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    return run_cli(get_args_parser(), prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
