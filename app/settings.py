"""Where the clinician app finds its checkpoint, its runs folder and its audit log (command line, then environment).

``streamlit run app/streamlit_app.py -- --checkpoint PATH [--runs DIR] [--audit-log FILE]``; the same settings come
from ``$COVIDXR_CHECKPOINT``, ``$COVIDXR_RUNS`` and ``$COVIDXR_AUDIT_LOG``. Command-line values win.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_ENV = "COVIDXR_CHECKPOINT"
RUNS_ENV = "COVIDXR_RUNS"
AUDIT_ENV = "COVIDXR_AUDIT_LOG"
DEFAULT_RUNS = "runs"
SCRIPT_NAME = "streamlit_app.py"

TRAIN_COMMANDS = """\
# 1. train (about 402 real images in ../shared/data/cxr; use your own manifest or folder for real work)
python -m covidxr.train --data ../shared/data/cxr --arch resnet50 --img-size 224 --epochs 10 --out runs/resnet50
# 2. evaluate on the held-out test split (writes runs/resnet50/eval/metrics.json and report.html)
python -m covidxr.evaluate --checkpoint runs/resnet50/best.pt
# 3. start this page with the model
streamlit run app/streamlit_app.py -- --checkpoint runs/resnet50/best.pt"""


@dataclass(frozen=True)
class AppSettings:
    """The app's start-up settings.

    Attributes:
        checkpoint: the checkpoint given on the command line or in the environment, or None.
        runs: folder searched for ``*/best.pt`` checkpoints offered in the sidebar.
        audit_log: audit log file given on the command line or in the environment, or None (beside the checkpoint).
    """

    checkpoint: Path | None
    runs: Path
    audit_log: Path | None


def _parser() -> argparse.ArgumentParser:
    """The command-line parser of the arguments after ``--``."""
    parser = argparse.ArgumentParser(prog="streamlit run app/streamlit_app.py --", add_help=False)
    parser.add_argument("--checkpoint", help=f"model checkpoint (best.pt); default ${CHECKPOINT_ENV}")
    parser.add_argument("--runs", help=f"folder of run folders to offer in the sidebar; default ${RUNS_ENV} or runs/")
    parser.add_argument("--audit-log", help=f"audit log file; default ${AUDIT_ENV} or audit.jsonl beside the model")
    return parser


def script_args(argv: Sequence[str] | None = None) -> list[str]:
    """The arguments given to the app script, or none when the process is not ``streamlit run`` of this script.

    ``streamlit run app/streamlit_app.py -- ARGS`` sets ``sys.argv`` to ``[script, *ARGS]``. Under a test runner
    (AppTest) ``sys.argv`` belongs to pytest and must not be parsed.

    Args:
        argv: the full argument vector (default ``sys.argv``).

    Returns:
        The app's own arguments.
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == SCRIPT_NAME:
        return argv[1:]
    return []


def load_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> AppSettings:
    """Read the settings from the script's arguments, then the environment.

    Args:
        argv: the full argument vector (default ``sys.argv``).
        environ: the environment (default ``os.environ``).

    Returns:
        The settings; unknown arguments are ignored.
    """
    env = os.environ if environ is None else environ
    args, _unknown = _parser().parse_known_args(script_args(argv))
    checkpoint = args.checkpoint or env.get(CHECKPOINT_ENV) or None
    audit = args.audit_log or env.get(AUDIT_ENV) or None
    return AppSettings(
        checkpoint=Path(checkpoint).expanduser() if checkpoint else None,
        runs=Path(args.runs or env.get(RUNS_ENV) or DEFAULT_RUNS).expanduser(),
        audit_log=Path(audit).expanduser() if audit else None,
    )


def find_checkpoints(runs: Path) -> list[Path]:
    """The ``best.pt`` files of the run folders directly under ``runs``, newest first.

    Args:
        runs: the runs folder (may be missing).

    Returns:
        The checkpoint paths (resolved).
    """
    try:
        found = [p.resolve() for p in runs.glob("*/best.pt") if p.is_file()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def checkpoint_choices(settings: AppSettings) -> list[Path]:
    """The checkpoints offered in the sidebar: the configured one first, then those under the runs folder.

    Args:
        settings: the start-up settings.

    Returns:
        Distinct checkpoint paths; empty when there is none.
    """
    choices: list[Path] = []
    if settings.checkpoint is not None:
        choices.append(settings.checkpoint.resolve())
    for path in find_checkpoints(settings.runs):
        if path not in choices:
            choices.append(path)
    return choices


def run_label(checkpoint: Path) -> str:
    """A checkpoint as the sidebar names it: its run's name (the file's name too when it is not ``best.pt``)."""
    return checkpoint.parent.name + ("" if checkpoint.name == "best.pt" else f" ({checkpoint.stem})")
