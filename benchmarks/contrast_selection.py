"""Issue 26: choose the recipe on the contrasts a held-out source can really measure, never on the external set.

The rule (docs/results.md, "Choosing the recipe, round two", written 2026-12-06 before any of these runs):
- Scored folds: a held-out source that gives both classes of a contrast from one collection, scored threshold-free on
  that contrast alone: ``siim`` COVID vs normal, NIH pneumonia vs normal, Kermany pneumonia vs normal (the ROC-AUC of
  p(a) / (p(a) + p(b)) on the source's films of classes a and b). Score = 0.5 siim + 0.25 NIH + 0.25 Kermany.
- Hannover (one class) and ieee8023 (a compilation) are reported beside the score, never in it; so is the decision
  (recall of each class present; share of films called a class the source does not have).
- Seeds 0, 1, 2: score = mean over seeds; spread = max - min of per-seed scores; rows within the larger spread are
  tied, and a tie goes to the simpler row (fewer flags).
- ``probe`` runs every row and seed (linear head on the ImageNet features of the row's input pipeline, trained with
  the row's loss and sampling); ``finetune`` fine-tunes the ``siim`` fold (10 epochs) and decides where it disagrees
  with the probe.

Usage::

    python benchmarks/contrast_selection.py probe --runs DIR [--rows hist contrast ...] [--seeds 0 1 2]
    python benchmarks/contrast_selection.py finetune --runs DIR [--rows ...] [--seeds 0]
    python benchmarks/contrast_selection.py choose --runs DIR      # writes DIR/selection.md and prints it
    python benchmarks/contrast_selection.py goals --runs DIR --rows contrast --seeds 0 1 2   # after the choice
    python benchmarks/contrast_selection.py ensemble --runs DIR --rows contrast   # the goal seeds as one model
    python benchmarks/contrast_selection.py tta --runs DIR --rows contrast        # seed 0 with --tta
    python benchmarks/contrast_selection.py table --runs DIR                      # every result in one table

Data: ``$COVIDXR_DATA`` or ``../shared/data/all.csv`` beside the checkout; ``goals`` reports ``external/`` beside it
(``$COVIDXR_EXTERNAL``), after the choice. Finished runs are reused, so every step can be stopped and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = os.environ.get("COVIDXR_DATA") or str(SHARED / "all.csv")
# External films: reported after the choice, never chosen on.
EXTERNAL = os.environ.get("COVIDXR_EXTERNAL") or str(SHARED / "external")
SIIM = "SIIM-FISABIO-RSNA COVID-19 (via vikasb512/Capstone-Project)"
NIH = "NIH ChestX-ray8 (via muhammedtalo/COVID-19)"
KERMANY = "lecuong1502/BTL_Machine_Learning"
SCORED = {SIIM: (("covid", "normal"), 0.5), NIH: (("pneumonia", "normal"), 0.25),
          KERMANY: (("pneumonia", "normal"), 0.25)}
SHORT = {SIIM: "siim", NIH: "NIH", KERMANY: "Kermany", "hida6/covid-chestxray-dataset": "ieee8023",
         "Hannover Medical School (ml-workgroup/covid-19-image-repository)": "Hannover"}
CONTRAST = ["--loss", "contrast", "--balance", "sqrt", "--epoch-size", "1400"]
ROWS = {"hist": ["--equalize", "hist"], "contrast": ["--equalize", "hist", *CONTRAST],
        "lungcrop-contrast": ["--lung-crop", "--equalize", "hist", *CONTRAST]}
# What the quickstart trains for a row: on a 2-core CPU at most 1,400 films an epoch (drawn uniformly unless the row
# balances otherwise), so that an epoch on 4,150 films takes about the time one on 1,398 took; a GPU sets
# --epoch-size 0 (every film, every epoch).
BUDGET = ["--epoch-size", "1400"]
SIMPLICITY = ("hist", "contrast", "lungcrop-contrast")  # ties go left
TRAIN = ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--img-size", "224", "--epochs", "10",
         "--workers", "0"]


def row_settings(name: str) -> dict:
    """A row's flags as CrossvalConfig's flat settings (``CrossvalConfig.from_dict``)."""
    flags = ROWS[name]

    def value(flag: str, default: str) -> str:
        return flags[flags.index(flag) + 1] if flag in flags else default

    return {"lung_crop": "--lung-crop" in flags, "equalize": value("--equalize", "none"),
            "balance": value("--balance", "loss"), "loss": value("--loss", "softmax"),
            "epoch_size": int(value("--epoch-size", "0"))}


def contrast_auc(probs: np.ndarray, labels: np.ndarray, classes: list[str], pair: tuple[str, str]) -> float:
    """ROC-AUC of p(a) / (p(a) + p(b)) separating the films of class a from those of class b (others ignored)."""
    a, b = (classes.index(c) for c in pair)
    rows = np.isin(labels, pair)
    score = probs[rows, a] / np.clip(probs[rows, a] + probs[rows, b], 1e-12, None)
    return float(roc_auc_score(labels[rows] == pair[0], score))


def fold_summary(source: str, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """A held-out fold's contrast score (scored folds), recall per class present and calls of absent classes."""
    calls = np.array(classes)[probs.argmax(1)]
    present = sorted(set(labels))
    out = {"source": source, "n": int(len(labels)),
           "recall": {c: float(np.mean(calls[labels == c] == c)) for c in present},
           "absent_calls": {c: int(np.sum(calls == c)) for c in classes if c not in present}}
    if source in SCORED:
        out["contrast_auc"] = contrast_auc(probs, labels, classes, SCORED[source][0])
    return out


def probe(runs: Path, rows: list[str], seeds: list[int]) -> None:
    """Leave-one-source-out probe folds per row and seed; writes ``runs/probe-<row>.json``."""
    import torch

    from covidxr.crossval import folds as cv
    from covidxr.utils import softmax

    torch.set_num_threads(1)  # a linear head's tiny steps: more threads only wait for each other
    device = torch.device("cpu")
    for name in rows:
        target = runs / f"probe-{name}.json"
        if target.is_file():
            print(f"{name}: reused {target}")
            continue
        start = time.perf_counter()
        base = cv.CrossvalConfig.from_dict({"data": DATA, "out": runs / f"probe-{name}", "bootstrap": 0, "workers": 0,
                                              "device": "cpu", **row_settings(name)})
        data = cv.load_all(base)
        sources, _ = cv.held_out_sources(data, base.min_images)
        feats = cv.backbone_features(data, base, device)
        folds = []
        for seed in seeds:
            cfg = replace(base, seed=seed, out=base.out / f"s{seed}")
            for source in sources:
                split, logits, _best = cv.train_fold(data, source, cfg, feats, device)
                test = split["split"].to_numpy() == "test"
                folds.append({"seed": seed, **fold_summary(source, softmax(logits),
                                                           split.loc[test, "label"].to_numpy(), data.classes)})
                print(f"{name} seed {seed} {SHORT.get(source, source)}: {folds[-1]}", flush=True)
        target.write_text(json.dumps({"row": name, "flags": ROWS[name], "seeds": seeds, "folds": folds,
                                      "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")


def finetune(runs: Path, rows: list[str], seeds: list[int]) -> None:
    """The full protocol on the siim fold: fine-tune without siim (10 epochs), predict siim; ``finetune-<row>.json``."""
    for name in rows:
        for seed in seeds:
            out = runs / f"finetune-siim-{name}-s{seed}"
            metrics = out / "eval-heldout" / "predictions.csv"
            if not metrics.is_file():
                train = [sys.executable, "-m", "covidxr.train", "--data", DATA, *TRAIN, "--no-gate", "--seed",
                         str(seed), "--test-frac", "0", "--holdout-source", SIIM, *ROWS[name], "--out", str(out)]
                evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"),
                            "--bootstrap", "0", "--lung-share-limit", "0", "--out", str(out / "eval-heldout")]
                run_logged(runs, f"finetune-siim-{name}-s{seed}.log",
                           ([] if (out / "best.pt").is_file() else [train]) + [evaluate])
            preds = pd.read_csv(metrics)
            classes = [c[4:] for c in preds.columns if c.startswith("raw_")]
            probs = preds[[f"raw_{c}" for c in classes]].to_numpy()
            summary = {"seed": seed, **fold_summary(SIIM, probs, preds["label"].to_numpy(), classes)}
            (runs / f"finetune-{name}-s{seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"{name} seed {seed} siim fine-tune: {summary}", flush=True)


def run_logged(runs: Path, log: str, commands: list[list[str]]) -> None:
    """Run commands one after another, appending their output to ``runs/log``; stop at the first failure."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / log, "a", encoding="utf-8") as out:
        for command in commands:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            start = time.perf_counter()
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
            out.write(f"# exit {code} after {time.perf_counter() - start:.0f}s\n")
            if code:
                raise SystemExit(f"{shlex.join(command)} failed ({code}); see {runs / log}")


def row_scores(folds: list[dict], seeds: list[int]) -> tuple[float, float, list[float]]:
    """(score, spread, per-seed scores) of one row's probe folds."""
    per_seed = []
    for seed in seeds:
        got = {f["source"]: f["contrast_auc"] for f in folds if f["seed"] == seed and "contrast_auc" in f}
        per_seed.append(sum(weight * got[s] for s, (_pair, weight) in SCORED.items()))
    return float(np.mean(per_seed)), float(np.ptp(per_seed)), per_seed


def choose(runs: Path) -> str:
    """Apply the rule to every probe present (and the siim fine-tunes); write ``runs/selection.md``."""
    results = {}
    for name in SIMPLICITY:
        path = runs / f"probe-{name}.json"
        if path.is_file():
            content = json.loads(path.read_text())
            results[name] = (content, *row_scores(content["folds"], content["seeds"]))
    lines = ["| row | score | spread | siim COVID-vs-normal AUC | NIH pneumonia-vs-normal | Kermany | decision "
             "(mean over seeds): recall per class; films called an absent class | Hannover recall | ieee8023 recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (content, score, spread, _per_seed) in results.items():
        folds = content["folds"]

        def mean(source: str, key: str, folds: list[dict] = folds) -> dict | float:
            rows = [f for f in folds if f["source"] == source]
            if key == "contrast_auc":
                return float(np.mean([f[key] for f in rows]))
            return {c: float(np.mean([f[key][c] for f in rows])) for c in rows[0][key]}

        decision = "; ".join(
            f"{SHORT[s]} " + ", ".join(f"{c} {v:.2f}" for c, v in mean(s, "recall").items()) + " / absent "
            + ", ".join(f"{c} {v:.0f}" for c, v in mean(s, "absent_calls").items())
            for s in SCORED)
        others = [", ".join(f"{c} {v:.2f}" for c, v in mean(s, "recall").items())
                  if any(f["source"] == s for f in folds) else "" for s in (
                      "Hannover Medical School (ml-workgroup/covid-19-image-repository)",
                      "hida6/covid-chestxray-dataset")]
        lines.append(f"| {name} | {score:.3f} | {spread:.3f} | {mean(SIIM, 'contrast_auc'):.3f} | "
                     f"{mean(NIH, 'contrast_auc'):.3f} | {mean(KERMANY, 'contrast_auc'):.3f} | {decision} | "
                     f"{others[0]} | {others[1]} |")
    best = max(results, key=lambda n: results[n][1])
    chosen = next(n for n in SIMPLICITY if n in results
                  and results[best][1] - results[n][1] <= max(results[best][2], results[n][2]))
    fine = {}
    for path in sorted(runs.glob("finetune-*-s*.json")):
        row = path.stem.removeprefix("finetune-").rsplit("-s", 1)[0]
        fine.setdefault(row, []).append(json.loads(path.read_text())["contrast_auc"])
    lines += ["", f"Probe choice: **{chosen}** (highest score: {best})."]
    if fine:
        lines += ["", "| row | siim fine-tune COVID-vs-normal AUC (seeds) |", "|---|---|"]
        lines += [f"| {row} | {np.mean(v):.3f} ({', '.join(f'{x:.3f}' for x in v)}) |" for row, v in fine.items()]
        probe_siim = {n: float(np.mean([f["contrast_auc"] for f in results[n][0]["folds"] if f["source"] == SIIM]))
                      for n in results}
        pairs = [(a, b) for a in fine for b in fine if a < b and a in probe_siim and b in probe_siim]
        for a, b in pairs:
            if (np.mean(fine[a]) - np.mean(fine[b])) * (probe_siim[a] - probe_siim[b]) < 0:
                winner = a if np.mean(fine[a]) > np.mean(fine[b]) else b
                lines.append(f"- probe and fine-tune disagree on siim between {a} and {b}: the fine-tune decides "
                             f"({winner}).")
                if chosen in (a, b):
                    chosen = winner
    lines += ["", f"**Chosen: {chosen}** (`{' '.join(ROWS[chosen])}`)"]
    text = "\n".join(lines) + "\n"
    (runs / "selection.md").write_text(text)
    print(text)
    return chosen


def goals(runs: Path, rows: list[str], seeds: list[int]) -> None:
    """Train a row on all of ``DATA`` (quickstart settings) and evaluate it with ``external/`` (reported only)."""
    for name in rows:
        for seed in seeds:
            out = runs / f"goals-{name}-s{seed}"
            # Seeds after 0 train on seed 0's patient split, so that they also make a seed ensemble.
            split = ["--split-from", str(runs / f"goals-{name}-s0")] if seed != 0 else []
            budget = [] if "--epoch-size" in ROWS[name] else BUDGET
            train = [sys.executable, "-m", "covidxr.train", "--data", DATA, *TRAIN, "--seed", str(seed),
                     *ROWS[name], *budget, *split, "--out", str(out)]
            evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"),
                        "--external", EXTERNAL]
            if not (out / "eval" / "metrics.json").is_file():
                run_logged(runs, f"goals-{name}-s{seed}.log", ([] if (out / "best.pt").is_file() else [train])
                           + [evaluate])
            print(f"{name} seed {seed}: {out / 'eval' / 'metrics.json'}", flush=True)


def ensemble(runs: Path, name: str) -> None:
    """Combine the row's goal seeds (one patient split) into a seed ensemble and evaluate it with ``external/``."""
    members = sorted(runs.glob(f"goals-{name}-s*/best.pt"))
    out = runs / f"ens-{name}"
    commands = [] if (out / "best.pt").is_file() else [
        [sys.executable, "-m", "covidxr.ensemble", *(str(m.parent) for m in members), "--out", str(out)]]
    commands.append([sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"), "--external",
                     EXTERNAL])
    run_logged(runs, f"ens-{name}.log", commands)


def tta(runs: Path, name: str) -> None:
    """Test-time augmentation of the row's seed-0 goal run, with ``external/`` (writes ``eval-tta/``)."""
    run = runs / f"goals-{name}-s0"
    run_logged(runs, f"tta-{name}.log", [[sys.executable, "-m", "covidxr.evaluate", "--checkpoint",
                                          str(run / "best.pt"), "--tta", "--external", EXTERNAL]])


def two_class_recall(preds: pd.DataFrame) -> dict[str, float]:
    """Recall of COVID and of normal when the decision is the argmax over those two outputs (pneumonia set aside)."""
    two = preds[["covid", "normal"]].idxmax(axis=1)
    return {c: float((two[preds["label"] == c] == c).mean()) for c in ("covid", "normal")}


def result_values(path: Path) -> dict[str, float]:
    """The goal figures of one evaluation folder's ``metrics.json`` and external predictions (first external set)."""
    metrics = json.loads(path.read_text())
    ext = metrics["external"][0]
    sets = {s["name"]: s for s in metrics["covid_vs_rest"]["sets"]}
    e = sets[f"external {ext['name']}"]
    siim = next((s for n, s in sets.items() if n.startswith("internal test: SIIM")), None)
    rec = ext["metrics"]["per_class"]
    two = two_class_recall(pd.read_csv(path.parent / f"predictions-external-{ext['name']}.csv"))
    return {"auc": e["auc"]["estimate"], "sensitivity": e["sensitivity"]["estimate"],
            "specificity": e["specificity"]["estimate"], "threshold": metrics["covid_vs_rest"]["threshold"],
            "recall_covid": rec["covid"]["recall"], "recall_normal": rec["normal"]["recall"],
            "called_pneumonia": float(ext.get("absent_class_calls", {}).get("pneumonia", float("nan"))),
            "two_recall_covid": two["covid"], "two_recall_normal": two["normal"],
            "siim_auc": siim["auc"]["estimate"] if siim else float("nan"), "ece": ext["metrics"]["ece"],
            "lung_share": (ext.get("lung_share") or {}).get("mean") or float("nan")}


def result_row(label: str, v: dict[str, float]) -> str:
    """One markdown results row from :func:`result_values` (or their mean over seeds)."""
    return (f"| {label} | {v['auc']:.3f} | {v['sensitivity']:.2f} / {v['specificity']:.2f} ({v['threshold']:.3f}) | "
            f"{v['recall_covid']:.2f} / {v['recall_normal']:.2f} | {v['called_pneumonia']:.0f} | "
            f"{v['two_recall_covid']:.2f} / {v['two_recall_normal']:.2f} | {v['siim_auc']:.3f} | {v['ece']:.3f} | "
            f"{v['lung_share']:.3f} |")


def table(runs: Path) -> str:
    """Every goals, ensemble and TTA evaluation in ``runs`` as one markdown table (``runs/goals.md``), and for a row
    with several goal seeds their mean (the issue's goals are means over seeds 0-2)."""
    lines = ["| run | external COVID-vs-rest AUC | sensitivity / specificity (threshold) | recall covid / normal | "
             "films called pneumonia (of 199) | recall covid / normal, argmax over covid and normal | siim test "
             "COVID-vs-normal AUC | ECE | lung share |", "|---|---|---|---|---|---|---|---|---|"]
    seeds: dict[str, list[dict[str, float]]] = {}
    for path in sorted(runs.glob("*/eval*/metrics.json")):
        if path.parent.name in ("eval", "eval-tta") and (path.parent.parent.name.startswith(("goals-", "ens-"))):
            label = path.parent.parent.name + (" + TTA" if path.parent.name == "eval-tta" else "")
            values = result_values(path)
            lines.append(result_row(label, values))
            if path.parent.name == "eval" and label.startswith("goals-"):
                seeds.setdefault(label.rsplit("-s", 1)[0], []).append(values)
    for row, runs_of_row in seeds.items():
        if len(runs_of_row) > 1:
            mean = {k: float(np.mean([v[k] for v in runs_of_row])) for k in runs_of_row[0]}
            lines.append(result_row(f"{row}, mean of {len(runs_of_row)} seeds", mean))
    text = "\n".join(lines) + "\n"
    (runs / "goals.md").write_text(text)
    print(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("probe", "finetune", "choose", "goals", "ensemble", "tta", "table"))
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--rows", nargs="+", default=list(SIMPLICITY), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = p.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.step == "probe":
        probe(args.runs, args.rows, args.seeds)
    elif args.step == "finetune":
        finetune(args.runs, args.rows, args.seeds)
    elif args.step == "choose":
        choose(args.runs)
    elif args.step == "goals":
        goals(args.runs, args.rows, args.seeds)
    elif args.step == "ensemble":
        ensemble(args.runs, args.rows[0])
    elif args.step == "tta":
        tta(args.runs, args.rows[0])
    else:
        table(args.runs)


if __name__ == "__main__":
    main()
