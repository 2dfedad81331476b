"""``python -m covidxr.compare``: compare evaluated runs on the same images, with paired patient-level bootstrap tests.

Usage::

    python -m covidxr.compare runs/r50 runs/densenet runs/r18/eval --out runs/compare --bootstrap 2000

Each argument is an evaluation folder (holding ``metrics.json`` and ``predictions.csv`` from
``python -m covidxr.evaluate``) or a run folder (its ``eval/`` is used). All evaluations must cover the same images
(same ``relpath`` values and labels) with the same classes, or the comparison is refused.

Writes ``comparison.csv`` and ``comparison.html`` (headline metrics with 95% intervals, one row per run, the intervals
recomputed on the same patient resamples for every run), ``pairs.csv`` (every pair's difference in macro ROC-AUC with
its paired-bootstrap interval, p-value and Holm-adjusted p-value), ``comparison.json`` and
``checklist-differences.md``: the reporting-checklist facts (data, split, model selection, thresholds, calibration,
...) that differ between the runs (when the runs were evaluated on different images, the refusal names them). Errors a
user can cause print one line ``covidxr.compare: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidxr.errors import CovidxrError
from covidxr.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_auc
from covidxr.evaluation.checklist_diff import differences_markdown, fact_differences
from covidxr.evaluation.metrics import HEADLINE
from covidxr.evaluation.results import EvaluationRecord, load_evaluation, record_json
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.html_page import Section, format_value, paragraph_html, render_html, table_html
from covidxr.utils import OneLineParser, add_out_arg, int_at_least, run_cli

PROG = "covidxr.compare"
ALPHA = 0.05


@dataclass
class EvaluatedRun:
    """One evaluation: its name, folder, metrics.json's record and predictions (rows in the common order)."""

    name: str
    folder: Path
    record: EvaluationRecord
    predictions: pd.DataFrame


# ------------------------------------------------------------------------------------------------------- loading


def _names(folders: Sequence[Path]) -> list[str]:
    """Short unique display names: the run folder's name (plus the evaluation folder's when it is not ``eval``)."""
    names = []
    for folder in folders:
        base = folder.parent.name if folder.name == "eval" else f"{folder.parent.name}/{folder.name}"
        name, i = base, 2
        while name in names:
            name, i = f"{base} ({i})", i + 1
        names.append(name)
    return names


def load_runs(paths: Sequence[str | os.PathLike]) -> list[EvaluatedRun]:
    """Read every evaluation.

    Args:
        paths: Evaluation or run folders.

    Returns:
        The evaluations, in argument order.

    Raises:
        CovidxrError: A folder holds no evaluation, or fewer than two were given.
    """
    if len(paths) < 2:
        raise CovidxrError("give at least two evaluation (or run) folders to compare")
    loaded = [load_evaluation(p) for p in paths]
    names = _names([folder for _, _, folder in loaded])
    return [EvaluatedRun(n, folder, m, p) for n, (m, p, folder) in zip(names, loaded, strict=True)]


def align(runs: list[EvaluatedRun]) -> tuple[list[str], np.ndarray, np.ndarray, list[np.ndarray]]:
    """Check that all runs were evaluated on the same images and put their rows in one order.

    Args:
        runs: The evaluations.

    Returns:
        ``(classes, labels (N,), patient ids (N,), one (N, C) probability array per run)``; rows follow the first
        run's ``relpath`` order.

    Raises:
        CovidxrError: Different classes, different images, duplicated images or different labels.
    """
    first = runs[0]
    classes = list(first.record.classes or [])
    reference = first.predictions
    if reference["relpath"].duplicated().any():
        raise CovidxrError(f"{first.folder}: predictions.csv lists an image twice; cannot pair images")
    order = reference["relpath"].tolist()
    probs = []
    for run in runs:
        if list(run.record.classes or []) != classes:
            raise CovidxrError(f"{run.name} has classes {run.record.classes}, {first.name} has {classes}")
        table = run.predictions
        if set(table["relpath"]) != set(order) or len(table) != len(order):
            only_a = len(set(order) - set(table["relpath"]))
            only_b = len(set(table["relpath"]) - set(order))
            raise CovidxrError(f"{run.name} and {first.name} were not evaluated on the same images ({only_b} only in "
                               f"{run.name}, {only_a} only in {first.name}); evaluate both on the same --data/--split")
        table = table.set_index("relpath").loc[order]
        if (table["label"].astype(str).to_numpy() != reference["label"].astype(str).to_numpy()).any():
            raise CovidxrError(f"{run.name} and {first.name} disagree on the true labels of the same images")
        probs.append(table[classes].to_numpy(dtype=np.float64))
    index = {c: i for i, c in enumerate(classes)}
    y = reference["label"].map(index)
    if y.isna().any():
        raise CovidxrError(f"{first.folder}: predictions.csv has labels outside the classes {classes}")
    return classes, y.to_numpy(dtype=np.int64), reference["patient_id"].astype(str).to_numpy(), probs


# ------------------------------------------------------------------------------------------------------ analysis


def headline_rows(runs: list[EvaluatedRun], classes: list[str], y: np.ndarray, groups: np.ndarray,
                  probs: list[np.ndarray], n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per run: headline metrics with 95% intervals over the same patient resamples for every run.

    Args:
        runs: The evaluations.
        classes: Class names.
        y: Labels.
        groups: Patient ids.
        probs: Probabilities per run, aligned with ``y``.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed (the same for every run, so every run is scored on the same resamples).

    Returns:
        Rows with ``run``, ``arch``, ``checkpoint``, ``split``, ``n_images``, ``n_patients``, ``temperature`` and,
        per headline metric, ``{metric}`` (interval dict) and ``{metric}_lo`` / ``{metric}_hi``.
    """
    rows = []
    for run, p in zip(runs, probs, strict=True):
        ci = bootstrap_ci(y, p, groups.tolist(), classes, n_resamples=n_resamples, seed=seed)
        card = run.record.model_card or {}
        row = {"run": run.name, "arch": (card.get("model") or {}).get("arch"), "checkpoint": run.record.checkpoint,
               "split": run.record.split, "n_images": int(len(y)), "n_patients": int(len(set(groups))),
               "temperature": run.record.calibration.temperature if run.record.calibration else None}
        for name in HEADLINE:
            interval = ci["metrics"][name]
            row |= {name: interval, f"{name}_lo": interval["lo"], f"{name}_hi": interval["hi"]}
        rows.append(row)
    return rows


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (``None`` stays ``None``), for several pairwise tests at once."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def pairwise(runs: list[EvaluatedRun], y: np.ndarray, groups: np.ndarray, probs: list[np.ndarray],
             n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """Paired patient-level bootstrap of the macro ROC-AUC difference for every pair of runs.

    Returns:
        One row per pair: ``run_a``, ``run_b`` and ``metrics.paired_bootstrap_auc``'s fields, plus ``p_holm`` and
        ``significant_holm`` (Holm-adjusted over all pairs at alpha 0.05).
    """
    rows = []
    pairs = list(itertools.combinations(range(len(runs)), 2))
    for a, b in tqdm(pairs, desc="paired bootstrap", leave=False, disable=None):
        test = paired_bootstrap_auc(y, probs[a], probs[b], groups.tolist(), n_resamples=n_resamples, seed=seed,
                                    alpha=ALPHA)
        rows.append({"run_a": runs[a].name, "run_b": runs[b].name, **test})
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
        row["significant_holm"] = None if adjusted is None else bool(adjusted < ALPHA)
    return rows


# ------------------------------------------------------------------------------------------------------- outputs


def _csv_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows with interval dicts replaced by their estimates (their bounds are separate columns)."""
    return pd.DataFrame([{k: (v["estimate"] if isinstance(v, dict) and "estimate" in v else v)
                          for k, v in row.items()} for row in rows])


def render(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], n_resamples: int, seed: int,
           differences: list[dict[str, Any]] | None = None) -> str:
    """The comparison as a self-contained HTML page."""
    columns = ["run", "arch", "split", "n_images", "n_patients", "temperature",
               *[(m, f"{m.replace('_', ' ')} (95% CI)") for m in HEADLINE]]
    pair_columns = ["run_a", "run_b", ("auc_a", "macro AUC a"), ("auc_b", "macro AUC b"), ("diff", "a - b"),
                    ("lo", "CI lo"), ("hi", "CI hi"), ("p_value", "p"), ("p_holm", "p (Holm)"),
                    ("significant", "CI excludes 0"), ("significant_holm", "significant after Holm"), "n_valid"]
    method = (f"Intervals and tests resample patients (all images of a drawn patient together), {n_resamples} "
              f"resamples, seed {seed}; every run is scored on the same resamples. A difference is significant when "
              "its 95% paired-bootstrap interval excludes 0; with several pairs, use the Holm-adjusted p-values. "
              "Runs evaluated on the same confounded data can differ in how well they exploit the source: a "
              "significant difference here is not evidence of better disease detection.")
    sections = [Section("Headline metrics", table_html(rows, columns)),
                Section("Pairwise differences in macro ROC-AUC", table_html(pairs, pair_columns, digits=4)),
                Section("Method", paragraph_html(method))]
    names = [r["run"] for r in rows]
    sections.insert(2, Section("Checklist differences (data, selection, thresholds, ...)",
                               table_html(differences, ["fact", ("items", "checklist items"), *names])
                               if differences else paragraph_html("The runs' checklist facts are identical.")))
    return render_html(sections, title="Run comparison", subtitle=f"{len(rows)} runs on {rows[0]['n_images']} images")


def write_outputs(out: Path, rows: list[dict[str, Any]], pairs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write comparison.csv, pairs.csv, comparison.html and comparison.json atomically into ``out``."""
    atomic_write_bytes(out / "comparison.csv", _csv_rows(rows).to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(out / "pairs.csv", pd.DataFrame(pairs).to_csv(index=False).encode("utf-8"))
    atomic_write_text(out / "comparison.html", render(rows, pairs, meta["n_resamples"], meta["seed"],
                                                      meta["checklist_differences"]))
    payload = {**meta, "runs": rows, "pairs": pairs}
    atomic_write_text(out / "comparison.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    names = [r["run"] for r in rows]
    atomic_write_text(out / "checklist-differences.md", differences_markdown(meta["checklist_differences"], names))


def compare(paths: Sequence[str | os.PathLike], out: str | os.PathLike, n_resamples: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Compare evaluations and write the comparison files.

    Args:
        paths: Evaluation or run folders (at least two).
        out: Output folder.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``{"runs": rows, "pairs": pairs, "out": folder, ...}`` as in comparison.json.

    Raises:
        CovidxrError: Fewer than two evaluations, missing files, or evaluations on different images.
    """
    runs = load_runs(paths)
    differences = fact_differences([(r.name, record_json(r.record)) for r in runs])
    try:
        classes, y, groups, probs = align(runs)
    except CovidxrError as exc:
        changed = ", ".join(d["fact"] for d in differences) or "nothing"
        raise CovidxrError(f"{exc}; their reporting checklists differ in: {changed}") from exc
    rows = headline_rows(runs, classes, y, groups, probs, n_resamples, seed)
    pairs = pairwise(runs, y, groups, probs, n_resamples, seed)
    meta = {"classes": classes, "n_images": int(len(y)), "n_patients": int(len(set(groups))),
            "n_resamples": n_resamples, "seed": seed, "alpha": ALPHA,
            "evaluations": [str(r.folder) for r in runs], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checklist_differences": differences}
    folder = Path(out).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise CovidxrError(f"--out {folder} exists and is not a folder")
    write_outputs(folder, rows, pairs, meta)
    return {**meta, "runs": rows, "pairs": pairs, "out": str(folder)}


# -------------------------------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.compare`` parser."""
    p = OneLineParser(f"python -m {PROG}",
                      description="Compare evaluated runs on the same images: headline metrics with intervals and "
                                  "paired patient-bootstrap tests of macro ROC-AUC differences.")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_EVAL_DIR", help="evaluation folders, or run folders (eval/)")
    add_out_arg(p, "output folder (default: %(default)s)", Path("comparison"))
    p.add_argument("--bootstrap", type=int_at_least(1), default=1000, metavar="N", help="bootstrap resamples (1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p


def _print_summary(result: dict[str, Any]) -> None:
    """Print the comparison table and the pairwise verdicts."""
    for row in result["runs"]:
        print(f"{row['run']}: " + ", ".join(f"{m} {format_value(row[m])}" for m in HEADLINE))
    for pair in result["pairs"]:
        verdict = "significant" if pair["significant_holm"] else "not significant"
        print(f"{pair['run_a']} vs {pair['run_b']}: macro AUC difference {format_value(pair['diff'])} "
              f"({format_value(pair['lo'])} to {format_value(pair['hi'])}), p {format_value(pair['p_value'])}, "
              f"Holm p {format_value(pair['p_holm'])}: {verdict}")
    differences = result.get("checklist_differences") or []
    print("checklist differences: " + (", ".join(d["fact"] for d in differences) or "none"))
    print(f"comparison: {Path(result['out']) / 'comparison.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    return run_cli(get_args_parser(),
                   lambda args: _print_summary(compare(args.paths, args.out, args.bootstrap, args.seed)), argv)


if __name__ == "__main__":
    sys.exit(main())
