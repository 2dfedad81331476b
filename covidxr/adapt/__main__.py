"""``python -m covidxr.adapt``: adapt a checkpoint to a new hospital from its own unlabelled films.

Usage::

    python -m covidxr.adapt --checkpoint RUN/best.pt --data SITE_FOLDER --site NAME [--out FOLDER] [--device auto]

Reads the folder's films (searched as ``predict`` searches; labels, folder names and metadata files are never read),
runs them through the input gate (refused films take no part), and writes the site profile into ``--out`` (default
``RUN/sites/NAME/``): ``site.json`` and ``bn_stats.pt``, pinned to the checkpoint's SHA-256
(:mod:`covidxr.model.site_profile`). The checkpoint is left untouched. Use the profile with ``--site FOLDER`` in
``predict``, ``evaluate`` and ``export``, or choose it in the app's sidebar; delete the folder to reset.

Exit status: 0 adapted; 1 done, but the collapse guard refused the profile (it is written with the reason, and the
model runs unadapted with it); 2 bad arguments or input (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from covidxr.adapt.estimate import AdaptSettings
from covidxr.adapt.site import adapt_site
from covidxr.errors import CovidxrError
from covidxr.model.site_profile import SITES_FOLDER
from covidxr.utils import (
    EXIT_DONE,
    EXIT_SOME_FAILED,
    OneLineParser,
    add_checkpoint_arg,
    add_device_arg,
    add_out_arg,
    int_at_least,
    run_cli,
    setup_logging,
)

PROG = "python -m covidxr.adapt"


def _site_name(text: str) -> str:
    """A site name for argparse: letters, digits, ``-``, ``_``, ``.`` and spaces, 1 to 64 characters."""
    if not re.fullmatch(r"[\w .-]{1,64}", text) or not text.strip(" ."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a site name (letters, digits, - _ . and spaces, at most 64)")
    return text.strip()


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.adapt`` parser."""
    d = AdaptSettings()
    p = OneLineParser(PROG, description="Adapt a checkpoint to a hospital from its own unlabelled films: batch-norm "
                                        "statistics (and, if asked, class priors), written as a site profile beside "
                                        "the checkpoint.")
    add_checkpoint_arg(p, "the run's checkpoint (best.pt); it is not changed")
    p.add_argument("--data", required=True, type=Path, metavar="SITE_FOLDER",
                   help="folder of the site's films (searched recursively; labels are never read)")
    p.add_argument("--site", required=True, type=_site_name, metavar="NAME", help="the site's name, shown with "
                   "every adapted answer")
    add_out_arg(p, f"folder of the profile (default: {SITES_FOLDER}/NAME beside the checkpoint)")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="films per forward pass")
    p.add_argument("--min-films", type=int_at_least(1), default=d.min_films,
                   help="fewest films the gate must accept (default: %(default)s)")
    p.add_argument("--shift-priors", action="store_true", help="also move the decision with the site's estimated "
                   "class priors (off by default: on the training sources' own test split it cost the rarest class "
                   "most of its recall; see docs/adapt.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""

    def run(args: argparse.Namespace) -> int:
        setup_logging()
        out = args.out or args.checkpoint.parent / SITES_FOLDER / args.site
        if out.exists() and not out.is_dir():
            raise CovidxrError(f"--out {out} exists and is not a folder")
        settings = AdaptSettings(batch_size=args.batch_size, min_films=args.min_films,
                                 shift_priors=args.shift_priors)
        profile = adapt_site(args.checkpoint, args.data, args.site, out, args.device, settings)
        record = profile.record
        print(f"{profile.describe()}; {record['n_films']} films used, {record['n_refused']} refused by the input "
              f"gate, {record['n_unreadable']} unreadable; priors {_priors(record)}; {record['seconds']} s; profile: "
              f"{profile.folder}")
        return EXIT_DONE if profile.adapted else EXIT_SOME_FAILED

    return run_cli(get_args_parser(), run, argv, (CovidxrError, OSError))


def _priors(record: dict) -> str:
    """``covid 0.48 (training 0.33), ...``."""
    return ", ".join(f"{c} {p:.2f} (training {s:.2f})" for c, p, s in
                     zip(record["classes"], record["site_priors"], record["source_priors"], strict=True))


if __name__ == "__main__":
    sys.exit(main())
