"""Ablation of issue 12 (CPU protocol): which preprocessing and balancing helps on the visible external test set?

Protocol (CPU-feasible, clearly not the fine-tuning recipe): EfficientNet-Lite0 with ImageNet weights at 224 px,
linear probe on backbone features computed once per run (``python -m covidxr.train --linear-probe``) on
``/work/shared/data/all.csv``, seeds 0, 1 and 2 per row (each seed is also a different patient split). Every run is
evaluated with ``python -m covidxr.evaluate --checkpoint RUN/best.pt --external /work/shared/data/external``.

Rows: ``none`` (plain loss balance), ``group`` (``--balance group``), ``lungcrop`` (``--lung-crop``), the
equalisation (``hist`` and ``clahe`` are both trained with the first seed, and only the one with the higher
*validation* macro ROC-AUC is evaluated and gets the other seeds), and ``recipe``: group balance (the held-out-source
idea: the validation split shares the training sources, so it cannot measure a source shortcut), plus the lung crop
and the chosen equalisation where each did not lower the first seed's validation macro ROC-AUC. Nothing here is
chosen on the external set: it is only reported.

Usage::

    python benchmarks/ablation.py --runs /tmp/ablation [--seeds 0 1 2]

Runs and evaluations already present are reused, so the script can be stopped and run again; it writes
``benchmarks/results/ablation-<date>.md`` with what has been measured (missing rows are listed as missing).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = "/work/shared/data/all.csv"
EXTERNAL = "/work/shared/data/external"
TRAIN = ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--img-size", "224", "--linear-probe",
         "--workers", "2"]
ROWS = {"none": [], "group": ["--balance", "group"], "lungcrop": ["--lung-crop"], "hist": ["--equalize", "hist"],
        "clahe": ["--equalize", "clahe"]}
COLUMNS = ("external balanced accuracy", "external normal recall", "external covid recall",
           "internal test macro AUC", "external Grad-CAM mass in lungs", "validation macro AUC")


def run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)


def commands(name: str, flags: list[str], seed: int, runs: Path, eval_flags: list[str]) -> tuple[Path, list, list]:
    out = runs / f"{name}-s{seed}"
    train = [sys.executable, "-m", "covidxr.train", "--data", DATA, *TRAIN, *flags, "--seed", str(seed),
             "--out", str(out)]
    evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"), "--external",
                EXTERNAL, *eval_flags]
    return out, train, evaluate


def validation_auc(name: str, flags: list[str], seed: int, runs: Path) -> float:
    """Train only (no external look) and return the run's best validation macro ROC-AUC."""
    out, train, _ = commands(name, flags, seed, runs, [])
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "best.pt").is_file():
        run(train, out / "log.txt")
    return float(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["best_auc"])


def train_and_evaluate(name: str, flags: list[str], seed: int, runs: Path, eval_flags: list[str]) -> dict:
    out, train, evaluate = commands(name, flags, seed, runs, eval_flags)
    validation_auc(name, flags, seed, runs)
    if not (out / "eval" / "metrics.json").is_file():
        run(evaluate, out / "log.txt")
    return measure(out, train, evaluate)


def measure(out: Path, train: list[str], evaluate: list[str]) -> dict:
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    ext = metrics["external"][0]
    recall = {c: m["recall"] for c, m in ext["metrics"]["per_class"].items()}
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["best_auc"]
    return {"external balanced accuracy": ext["metrics"]["balanced_accuracy"],
            "external normal recall": recall.get("normal"), "external covid recall": recall.get("covid"),
            "internal test macro AUC": metrics["metrics"]["roc_auc_macro"],
            "external Grad-CAM mass in lungs": ext["lung_share"]["mean"], "validation macro AUC": float(best),
            "train": shlex.join(train[1:]), "evaluate": shlex.join(evaluate[1:])}


def cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{mean:.3f}"


def write_table(path: Path, rows: dict[str, dict[int, dict]], labels: dict[str, str], notes: list[str],
                seeds: list[int]) -> None:
    lines = [f"# Ablation (issue 12 item 6), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "CPU protocol: EfficientNet-Lite0, ImageNet weights, 224 px, **linear probe** on backbone features "
             f"(`--linear-probe`) trained on `{DATA}`; seeds {seeds} (each seed also draws its own patient split). "
             "Cells: mean [min, max] over the seeds measured; `n` = seeds measured. External = the visible external "
             f"test set `{EXTERNAL}`, reported only (nothing was chosen on it). The Grad-CAM lung share is the mean "
             "share of the Grad-CAM mass (predicted class) inside the lung mask on the external images.", ""]
    lines += ["| row | n | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, by_seed in rows.items():
        got = list(by_seed.values())
        lines.append(f"| {labels[name]} | {len(got)} | " + " | ".join(cell([g[c] for g in got]) for c in COLUMNS)
                     + " |")
    lines += ["", *notes, "", "## Commands", ""]
    for name, by_seed in rows.items():
        for seed, got in sorted(by_seed.items()):
            lines += [f"- {labels[name]}, seed {seed}:", f"  - `python {got['train']}`",
                      f"  - `python {got['evaluate']}`"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="folder for the run folders (outside the repository)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-flags", default="--lung-share-limit 40 --bootstrap 100",
                   help="extra flags of python -m covidxr.evaluate")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                   f"ablation-{time.strftime('%Y-%m-%d')}.md")
    args = p.parse_args()
    eval_flags, first = shlex.split(args.eval_flags), args.seeds[0]
    rows: dict[str, dict[int, dict]] = {}
    labels = {"none": "none (plain loss balance)", "group": "group balance (--balance group)",
              "lungcrop": "lung crop (--lung-crop)"}
    notes: list[str] = []

    def measured(name: str, flags: list[str], seed: int) -> None:
        rows.setdefault(name, {})[seed] = train_and_evaluate(name, flags, seed, args.runs, eval_flags)
        write_table(args.out, rows, labels, notes, args.seeds)

    for name in ("none", "group", "lungcrop"):
        measured(name, ROWS[name], first)
    # Equalisation: both trained on the first seed, the one with the higher validation macro AUC is evaluated.
    val = {name: validation_auc(name, ROWS[name], first, args.runs) for name in ("none", "lungcrop", "hist", "clahe")}
    eq = max(("hist", "clahe"), key=val.get)
    labels[eq] = f"equalisation (--equalize {eq}, chosen on validation)"
    notes.append(f"Equalisation chosen on the validation split of seed {first} (validation macro ROC-AUC: hist "
                 f"{val['hist']:.3f}, clahe {val['clahe']:.3f}): {eq}.")
    # The recipe: group balance by the held-out-source idea (the validation split shares the training sources and
    # cannot measure it), plus the lung crop and the equalisation each where it did not lower validation AUC.
    recipe = ["--balance", "group"]
    if val["lungcrop"] >= val["none"]:
        recipe.append("--lung-crop")
    if val[eq] >= val["none"]:
        recipe += ["--equalize", eq]
    labels["recipe"] = f"chosen recipe ({' '.join(recipe)})"
    notes.append(f"Recipe rule (validation only, seed {first}; none {val['none']:.3f}, lung crop "
                 f"{val['lungcrop']:.3f}, {eq} {val[eq]:.3f}): group balance always (held-out-source idea), plus the "
                 "lung crop and the chosen equalisation where each did not lower the validation macro ROC-AUC.")
    specs = {"none": ROWS["none"], "group": ROWS["group"], "lungcrop": ROWS["lungcrop"], eq: ROWS[eq],
             "recipe": recipe}
    for seed in args.seeds:  # every row's first seed before any second seed: a cut-short table covers every row
        for name, flags in specs.items():
            if seed not in rows.get(name, {}):
                measured(name, flags, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
