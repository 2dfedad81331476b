"""Command line for datasets: ``python -m covidxr.data {prepare,fetch,audit} ...``.

Examples::

    python -m covidxr.data prepare kaggle-radiography --src ~/data/COVID-19_Radiography_Dataset --out data/kaggle
    python -m covidxr.data prepare covid-chestxray --src ~/data/covid-chestxray-dataset --out data/ieee \\
        --classes "covid=covid;pneumonia=pneumonia"
    python -m covidxr.data fetch covid-chestxray --dest data/ieee8023
    python -m covidxr.data audit ../shared/data/cxr --out runs/audit --format html

``prepare`` and ``fetch`` write ``manifest.csv`` into their ``--out`` folder, where ``--data FOLDER`` reads it.
Failures a user can cause print one line ``covidxr.data: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from covidxr.data.audit import TINY_SIDE, audit
from covidxr.data.audit_report import html_report, markdown_report, report_blocks, write_report
from covidxr.data.confounding import confounding_warnings
from covidxr.data.download import COVID_CHESTXRAY_URL, fetch_covid_chestxray
from covidxr.data.duplicates import NEAR_DUPLICATE_BITS
from covidxr.data.manifest import MANIFEST_NAMES, load_manifest, write_manifest
from covidxr.data.sources import ADAPTERS, Manifest, build_manifest
from covidxr.errors import CovidxrError
from covidxr.utils import OneLineParser, add_checkpoint_arg, add_out_arg, out_file, run_cli

PROG = "covidxr.data"
MANIFEST = MANIFEST_NAMES[0]  # the file name prepare and fetch write, and --data FOLDER reads


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare`` options to ``parser``."""
    parser.add_argument("kind", choices=list(ADAPTERS), help="dataset layout to read (see data/README.md)")
    parser.add_argument("--src", required=True, type=Path, help="the dataset's folder (or manifest for csv)")
    parser.add_argument("--out", required=True, type=Path, metavar="FOLDER",
                        help=f"folder to write the manifest into ({MANIFEST})")
    add_mapping_args(parser)
    return parser


def add_mapping_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--classes`` and ``--all-views``."""
    parser.add_argument("--classes", default=None, metavar="SPEC",
                        help="keep/merge classes: 'covid,normal' or 'covid=covid,COVID-19;non-covid=normal,pneumonia'")
    parser.add_argument("--all-views", action="store_true",
                        help="covid-chestxray: keep lateral and other non-frontal views (default: PA/AP only)")


def add_fetch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fetch`` options to ``parser``."""
    parser.add_argument("dataset", choices=["covid-chestxray"], help="dataset to download")
    parser.add_argument("--dest", required=True, type=Path, help="folder to download and extract into")
    parser.add_argument("--url", default=COVID_CHESTXRAY_URL, help="archive URL (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="network timeout in seconds")
    parser.add_argument("--archive", type=Path, default=None, help="use this local zip instead of downloading")
    add_out_arg(parser, f"folder to write the manifest into ({MANIFEST}; default: DEST)")
    add_mapping_args(parser)
    return parser


def add_audit_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``audit`` options to ``parser``."""
    parser.add_argument("data", type=Path, help="manifest CSV or dataset folder")
    parser.add_argument("--split", type=Path, default=None,
                        help="split.csv of a run, to find duplicates across splits")
    add_out_arg(parser, "folder for audit.md/audit.html and audit.json (default: print the report)")
    parser.add_argument("--format", choices=["md", "html"], default="md", help="report format")
    add_checkpoint_arg(parser, "checkpoint whose features are probed for a source signature", required=False,
                       old_name="--probe")
    parser.add_argument("--near-bits", type=int, default=NEAR_DUPLICATE_BITS,
                        help="near-duplicate threshold in bits of the 256-bit dHash (default: %(default)s)")
    parser.add_argument("--tiny-side", type=int, default=TINY_SIDE,
                        help="flag images whose shorter side is below this many pixels (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="threads reading images (default: %(default)s)")
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.data``."""
    parser = OneLineParser(prog=PROG, description="Prepare, download and audit chest X-ray datasets.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_prepare_args(sub.add_parser("prepare", help="write a manifest CSV for a public dataset"))
    add_fetch_args(sub.add_parser("fetch", help="download a public dataset and write its manifest"))
    add_audit_args(sub.add_parser("audit", help="report counts, duplicates, odd images and confounding"))
    return parser


def _print_manifest(manifest: Manifest, out: Path) -> None:
    """Print what a prepare step wrote and left out."""
    table = manifest.table
    counts = ", ".join(f"{k} {v}" for k, v in table["label"].value_counts().sort_index().items())
    print(f"wrote {out}: {len(table)} images, {table['patient_id'].nunique()} patients ({counts})")
    for reason, n in sorted(manifest.dropped.items()):
        print(f"  dropped {n}: {reason}")
    for note in manifest.notes:
        print(f"  note: {note}")
    for warning in confounding_warnings(table):
        print(f"  warning: {warning}")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare``: write the manifest of a public dataset."""
    manifest = build_manifest(args.kind, args.src, args.classes, args.all_views)
    _print_manifest(manifest, write_manifest(manifest.table, out_file(args.out, MANIFEST, PROG)))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Run ``fetch``: download (or take ``--archive``), extract, then write the manifest."""
    root = fetch_covid_chestxray(args.dest, url=args.url, timeout=args.timeout, archive=args.archive,
                                 progress=sys.stderr.isatty())
    print(f"dataset in {root}")
    manifest = build_manifest("covid-chestxray", root, args.classes, args.all_views)
    _print_manifest(manifest, write_manifest(manifest.table, out_file(args.out or args.dest, MANIFEST, PROG)))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """Run ``audit`` and print or write the report."""
    from covidxr.data.cache import default_cache_dir  # imports torch: seconds, for --checkpoint only

    table = load_manifest(args.data)
    result = audit(table, args.split, probe=args.checkpoint, near_bits=args.near_bits, tiny_side=args.tiny_side,
                   workers=args.workers, progress=sys.stderr.isatty(),
                   cache_dir=default_cache_dir() if args.checkpoint else None)
    title = f"Dataset audit: {args.data}"
    if args.out is None:
        blocks = report_blocks(result, title)
        print(markdown_report(blocks) if args.format == "md" else html_report(blocks), end="")
        return 0
    report = write_report(result, args.out, args.format, title)
    for warning in result["confounding"]:
        print(f"warning: {warning}")
    exact, near = result["exact_duplicates"]["summary"], result["near_duplicates"]["summary"]
    odd = ", ".join(f"{k} {len(v)}" for k, v in result["suspicious"].items())
    print(f"{result['n_images']} images; exact duplicates {exact['total']} (across splits {exact['cross_split']}); "
          f"near duplicates {near['total']} (across splits {near['cross_split']}); {odd}")
    print(f"wrote {report} and {report.with_name('audit.json')}")
    return 0


COMMANDS = {"prepare": run_prepare, "fetch": run_fetch, "audit": run_audit}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (``covidxr.utils.run_cli``; OSError too is a data problem)."""
    return run_cli(get_args_parser(), lambda args: COMMANDS[args.command](args), argv, (CovidxrError, OSError))


if __name__ == "__main__":
    sys.exit(main())
