"""``python -m covidxr.evaluate``: evaluate a checkpoint with intervals, calibration, breakdowns and a report.

Usage::

    python -m covidxr.evaluate --checkpoint runs/r50/best.pt                     # test split of the run's data
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --split val
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --data other/ --split all   # external dataset
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --external hospital-a/ --external hospital-b/
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --gate-variants --gate-check notcxr/   # input gate
    python -m covidxr.evaluate --checkpoint runs/r50/best.pt --data hospital-a/ --site runs/r50/sites/a   # adapted

The run's own data (default: the data it was trained on, split as recorded in ``split.csv`` beside the checkpoint
or in the checkpoint) is evaluated on its ``test`` split by default. The validation split is predicted as well: a
temperature is fitted on it (temperature scaling) and the decision thresholds of the operating points are chosen
on it. They go, with a compact summary, into the checkpoint's calibration sidecar ``best.calibration.json``
(:mod:`covidxr.model.calibration_file`), pinned to the checkpoint's SHA-256: evaluating never changes the model file,
and the report names the file by the same hash as the app.

A dataset whose images are not the run's split is *external*: all its images are evaluated (``--split all``), the
temperature and thresholds stored in the checkpoint are reused, images that were also in the run's data (same
path or same bytes) are flagged, and no sidecar is written.

``--external DIR`` (repeatable) evaluates the run's test split *and* each external folder in one call: the folders
reuse the temperature and thresholds chosen on the run's validation split, metrics.json lists them under
``external``, the sidecar's summary gets their headline, and the report shows them first, before the internal
test split. The cross-validation by source (``python -m covidxr.crossval``; ``--crossval PATH``, by default
``crossval/crossval.json`` beside the checkpoint) is reported beside them.

Output folder (default ``eval/`` beside the checkpoint; ``eval-<dataset>/`` for an external dataset):
``metrics.json``, ``predictions.csv``, ``report.html`` (self-contained) and the PNG plots. Errors a user can cause
print one line ``covidxr.evaluate: error: ...`` and exit with status 2.

For a paper: ``checklist.md`` and ``checklist.html`` (every item of CLAIM 2024 and TRIPOD+AI 2024, filled from the run
or marked "author to complete"), a failure gallery (``--gallery N`` most confident errors per class and set, with
Grad-CAM, pictures in ``gallery/``), subgroups where the metadata has them (sex, age band, view, source) and decision
curves of the positive class (``--prevalence P``; default: each set's own) are in the report; ``--pdf`` prints it to
``report.pdf`` with headless Chromium.

The input gate (:mod:`covidxr.evaluation.gate_report`) is run on the evaluated images: its refusal rate per source is
in ``metrics.json["gate"]`` and the report. ``--gate-variants`` adds rotated and inverted copies of the evaluated
images, ``--gate-check FOLDER`` (repeatable) an unlabelled folder of images it should refuse, counted per sub-folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidxr.evaluation.checklist import status_counts
from covidxr.evaluation.gate_report import gate_summary
from covidxr.evaluation.inputs import EvalOptions
from covidxr.evaluation.metrics import HEADLINE
from covidxr.evaluation.pipeline import evaluate
from covidxr.html_page import format_value
from covidxr.utils import OneLineParser, add_device_arg, add_out_arg, int_at_least, run_cli, setup_logging

PROG = "covidxr.evaluate"
SPLITS = ("test", "val", "all")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.evaluate`` parser."""
    p = OneLineParser(f"python -m {PROG}",
                      description="Evaluate a covidxr checkpoint: metrics with patient-bootstrap intervals, "
                                  "temperature scaling, operating points, breakdowns by source and view, HTML report.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint to evaluate (e.g. RUN/best.pt)")
    p.add_argument("--data", help="dataset folder or manifest (default: the run's training data)")
    p.add_argument("--split", choices=SPLITS, help="split to evaluate (default: test of the run's data; all for an "
                   "external dataset)")
    p.add_argument("--external", action="append", default=[], type=Path, metavar="DIR",
                   help="external dataset (folder or manifest) from hospitals absent from training, evaluated "
                        "besides the run's split and reported first (repeatable); never used to fit or choose anything")
    p.add_argument("--crossval", type=Path, metavar="PATH",
                   help="crossval.json of python -m covidxr.crossval to report (default: crossval/crossval.json "
                        "beside the checkpoint, when present)")
    add_out_arg(p, "output folder (default: eval/ beside the checkpoint; eval-<dataset>/ for an external dataset)")
    p.add_argument("--lung-share-limit", type=int_at_least(0), default=200, metavar="N",
                   help="mean share of the Grad-CAM mass (predicted class) inside the lungs over at most N images "
                        "of the test split and of each --external folder (0: skip; needs a lung model)")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=32,
                   help="images per batch (default: %(default)s)")
    add_device_arg(p)
    p.add_argument("--positive", help="positive class of the operating points (default: the class named like covid)")
    p.add_argument("--bootstrap", type=int_at_least(0), default=1000, metavar="N",
                   help="patient-level bootstrap resamples for the intervals (0: none; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("-j", "--workers", type=int_at_least(0), default=min(2, os.cpu_count() or 1),
                   help="image decoding and loading processes")
    p.add_argument("--gate-check", action="append", type=Path, default=[], metavar="FOLDER",
                   help="report the input gate's refusal rate on this unlabelled folder, per sub-folder (repeatable; "
                        "e.g. images that are not frontal chest radiographs)")
    p.add_argument("--gate-variants", action="store_true",
                   help="also report the gate's refusal rate of rotated (90/180/270) and inverted copies of the "
                        "evaluated images")
    p.add_argument("--gallery", type=int_at_least(0), default=4, metavar="N",
                   help="failure gallery: the N most confident errors per true class of each evaluated set, with "
                        "Grad-CAM (0: none; default 4)")
    p.add_argument("--prevalence", type=_prevalence, metavar="P",
                   help="COVID prevalence the decision curves assume, in (0, 1) (default: each set's own)")
    p.add_argument("--pdf", action="store_true", help="also write report.pdf with headless Chromium")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each film's probabilities over 5 views (as it is, zoomed "
                        "in and out 10%%, rotated 5 degrees each way); a measurement: the results go to eval-tta/ and "
                        "the checkpoint's calibration is left as it is")
    p.add_argument("--site", type=Path, metavar="PROFILE",
                   help="evaluate the model adapted to a site (a profile of python -m covidxr.adapt) on that site's "
                        "films (--data FOLDER); writes eval-<dataset>-site-NAME/; no gallery or lung share")
    return p


def _prevalence(text: str) -> float:
    """A prevalence in (0, 1), for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prevalence in (0, 1)")
    return value


def lung_share_text(share: dict[str, Any] | None) -> str:
    """One phrase for metrics.json's ``lung_share``."""
    if not share or share.get("mean") is None:
        return f"Grad-CAM lung share {(share or {}).get('note', 'not measured')}"
    return f"Grad-CAM mass inside the lungs {share['mean']:.3f} (median {share['median']:.3f}, n {share['n']})"


def _print_summary(result: dict[str, Any]) -> None:
    """Print the headline numbers, the warnings and where the report is."""
    ci = (result["ci"] or {}).get("metrics", {})
    numbers = ", ".join(f"{k} {format_value(ci.get(k) or result['metrics'].get(k))}" for k in HEADLINE)
    print(f"{result['split']} split of {result['data']}: {result['n_images']} images, {result['n_patients']} "
          f"patients; {numbers}; temperature {result['calibration']['temperature']:.3f}; "
          f"{lung_share_text(result.get('lung_share'))}")
    for ext in result["external"]:
        ci = (ext["ci"] or {}).get("metrics", {})
        numbers = ", ".join(f"{k} {format_value(ci.get(k) or ext['metrics'].get(k))}"
                            for k in ("balanced_accuracy", "roc_auc_macro"))
        print(f"external {ext['name']}: {ext['n_images']} images, {ext['n_patients']} patients; {numbers}; "
              f"{lung_share_text(ext.get('lung_share'))}")
    if result.get("gate"):
        print(gate_summary(result["gate"]))
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if result.get("checklist"):
        counts = status_counts(result["checklist"])
        print(f"checklist: {counts['filled']} items filled from the run, {counts['partly']} partly, "
              f"{counts['author']} for the author: {Path(result['out']) / 'checklist.md'}")
    if result.get("pdf"):
        print(result["pdf"])
    print(f"report: {Path(result['out']) / 'report.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run(args: argparse.Namespace) -> None:
        setup_logging()
        opts = EvalOptions(checkpoint=args.checkpoint, data=args.data, split=args.split, out=args.out,
                           batch_size=args.batch_size, device=args.device, positive=args.positive,
                           bootstrap=args.bootstrap, seed=args.seed, workers=args.workers,
                           command=["python", "-m", PROG, *argv], external=list(args.external),
                           crossval=args.crossval, gate_check=args.gate_check, gate_variants=args.gate_variants,
                           lung_share_limit=args.lung_share_limit, gallery=args.gallery, prevalence=args.prevalence,
                           pdf=args.pdf, tta=args.tta, site=args.site)
        _print_summary(evaluate(opts))

    return run_cli(get_args_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
