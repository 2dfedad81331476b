"""Issue 19: choose the training recipe by leave-one-source-out, never on the external set.

The rule (docs/results.md, "Choosing the recipe on held-out sources", written before any row ran):
- A fold holds one source of ``all.csv`` out of training and tests on it; it is valid only when every class of the
  held-out source is still in training from another source.
- A recipe's score is the held-out balanced accuracy averaged over the valid folds, per seed (0, 1, 2), then over the
  seeds; the worst fold (lowest 3-seed mean) is shown beside it; the seed spread is max - min of the per-seed means.
- Two recipes whose scores differ by no more than the larger of their seed spreads are tied, and a tie goes to the
  simpler recipe (fewer flags; then none < group < hist < lungcrop < lungmask).

``proxy`` (the score above): ``--mode probe`` folds, a linear head per fold on the ImageNet features of the recipe's
input pipeline (features computed once per recipe, heads trained per seed). ``full``: the full protocol on one fold
(10-epoch fine-tune of the quickstart, seed 0, ``siim`` held out) for four rows, to check that the proxy ranks them as
the full protocol does. ``choose``: apply the rule and write ``benchmarks/results/recipe-selection-<date>.md``.

Usage::

    python benchmarks/recipe_selection.py proxy --runs /tmp/sel [--rows none group ...] [--seeds 0 1 2]
    python benchmarks/recipe_selection.py full --runs /tmp/sel [--rows none group lungcrop lchist]
    python benchmarks/recipe_selection.py choose --runs /tmp/sel
    python benchmarks/recipe_selection.py goals --runs /tmp/sel [--rows ROW ...]   # default: the chosen row
    python benchmarks/recipe_selection.py ensemble --runs /tmp/sel [--rows ROW] [--seeds 0 1 2]   # after goals
    python benchmarks/recipe_selection.py tta --runs /tmp/sel   # after full: --tta on the held-out siim fold
    python benchmarks/recipe_selection.py table --runs /tmp/sel   # every goals/ensemble result in one table

Runs already present are reused, so each step can be stopped and run again. Only ``goals`` and ``ensemble`` read
``external/``, after the choice, to report results; nothing is chosen on them.
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

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "all.csv")
EXTERNAL = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "external")  # reported, never chosen on
SIIM = "SIIM-FISABIO-RSNA COVID-19 (via vikasb512/Capstone-Project)"
KERMANY = "lecuong1502/BTL_Machine_Learning"  # the paediatric films
TRAIN = ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--img-size", "224", "--epochs", "10",
         "--workers", "0", "--no-gate"]
ROWS = {"none": [], "group": ["--balance", "group"], "hist": ["--equalize", "hist"], "lungcrop": ["--lung-crop"],
        "lchist": ["--lung-crop", "--equalize", "hist"], "lungmask": ["--lung-mask"],
        "lchistgroup": ["--lung-crop", "--equalize", "hist", "--balance", "group"]}
SIMPLICITY = ("none", "group", "hist", "lungcrop", "lungmask", "lchist", "lchistgroup")  # ties go left
LABELS = {"none": "none (loss weights)", "group": "group balance", "hist": "equalisation (hist)",
          "lungcrop": "lung crop", "lchist": "lung crop + equalisation", "lungmask": "lung mask",
          "lchistgroup": "lung crop + equalisation + group balance"}
FULL_ROWS = ("none", "group", "lungcrop", "lchist")


def row_settings(name: str) -> dict:
    """A row's flags as CrossvalConfig's flat settings (``CrossvalConfig.from_dict``)."""
    flags = ROWS[name]
    return {"lung_crop": "--lung-crop" in flags, "lung_mask": "--lung-mask" in flags,
            "equalize": flags[flags.index("--equalize") + 1] if "--equalize" in flags else "none",
            "balance": flags[flags.index("--balance") + 1] if "--balance" in flags else "loss"}


def proxy(runs: Path, rows: list[str], seeds: list[int]) -> None:
    """Leave-one-source-out linear-probe folds per row and seed; writes ``runs/proxy-<row>.json``."""
    import torch

    from covidxr.crossval import folds as cv
    from covidxr.crossval.results import fold_result

    torch.set_num_threads(1)
    device = torch.device("cpu")
    for name in rows:
        target = runs / f"proxy-{name}.json"
        if target.is_file():
            print(f"{name}: reused {target}")
            continue
        start = time.perf_counter()
        base = cv.CrossvalConfig.from_dict({"data": DATA, "out": runs / f"proxy-{name}", "bootstrap": 0, "workers": 0,
                                              "device": "cpu", **row_settings(name)})
        data = cv.load_all(base)
        sources, _ = cv.held_out_sources(data, base.min_images)
        feats = cv.backbone_features(data, base, device)
        folds = []
        for seed in seeds:
            cfg = replace(base, seed=seed, out=base.out / f"s{seed}")
            for source in sources:
                valid = not cv.classes_missing_elsewhere(data.table, source)
                split, logits, best = cv.train_fold(data, source, cfg, feats, device)
                res = fold_result(source, split, logits, data.classes, cfg, best)
                folds.append({"seed": seed, "source": source, "valid": valid,
                              "balanced_accuracy": res["metrics"]["balanced_accuracy"],
                              "recall": {c: m["recall"] for c, m in res["metrics"]["per_class"].items()}})
                print(f"{name} seed {seed} {source[:30]}: bal.acc {folds[-1]['balanced_accuracy']:.3f}", flush=True)
        content = {"row": name, "flags": ROWS[name], "seeds": seeds, "folds": folds,
                   "seconds": round(time.perf_counter() - start, 1)}
        target.write_text(json.dumps(content, indent=2) + "\n")


def full(runs: Path, rows: list[str]) -> None:
    """The full protocol on the siim fold (seed 0): fine-tune without siim, evaluate on it."""
    for name in rows:
        out = runs / f"full-siim-{name}"
        metrics = out / "eval-heldout" / "metrics.json"
        if metrics.is_file():
            print(f"{name}: reused {metrics}")
            continue
        train = [sys.executable, "-m", "covidxr.train", "--data", DATA, *TRAIN, "--seed", "0", "--test-frac", "0",
                 "--holdout-source", SIIM, *ROWS[name], "--out", str(out)]
        evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"), "--bootstrap",
                    "0", "--lung-share-limit", "0", "--out", str(out / "eval-heldout")]
        run_logged(runs, f"full-siim-{name}.log", ([] if (out / "best.pt").is_file() else [train]) + [evaluate])


def tta(runs: Path, rows: list[str], spread: float) -> list[str]:
    """Test-time augmentation on the held-out source: each row's ``full`` model (fine-tuned without siim, seed 0)
    evaluated on siim again with ``--tta``; it joins the recipe only if it raises every row's held-out balanced
    accuracy by more than ``spread`` (the chosen row's seed spread), else the tie goes to the simpler recipe."""
    lines = ["| row | siim held out: balanced accuracy | with --tta | change | COVID-vs-rest AUC | with --tta |",
             "|---|---|---|---|---|---|"]
    gains = []
    for name in rows:
        out = runs / f"full-siim-{name}"
        evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"), "--tta",
                    "--bootstrap", "0", "--lung-share-limit", "0", "--gallery", "0",
                    "--out", str(out / "eval-heldout-tta")]
        if not (out / "eval-heldout-tta" / "metrics.json").is_file():
            run_logged(runs, f"full-siim-{name}.log", [evaluate])
        plain, augmented = (json.loads((out / folder / "metrics.json").read_text())
                            for folder in ("eval-heldout", "eval-heldout-tta"))
        aucs = [next(s["auc"]["estimate"] for s in m["covid_vs_rest"]["sets"] if s["name"] == "internal test")
                if m.get("covid_vs_rest") else float("nan") for m in (plain, augmented)]
        before, after = plain["metrics"]["balanced_accuracy"], augmented["metrics"]["balanced_accuracy"]
        gains.append(after - before)
        lines.append(f"| {LABELS[name]} | {before:.3f} | {after:.3f} | {after - before:+.3f} | {aucs[0]:.3f} | "
                     f"{aucs[1]:.3f} |")
    adopted = bool(gains) and min(gains) > spread
    lines += ["", f"Rule: adopt --tta only if every row gains more than {spread:.3f}; smallest gain {min(gains):+.3f}: "
              + ("adopted" if adopted else "not adopted (a tie goes to the simpler recipe, without TTA)")]
    return lines


def run_logged(runs: Path, log_name: str, commands: list[list[str]]) -> None:
    """Run ``commands`` one after the other on one thread each, appending their output to ``runs/log_name``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for cmd in commands:
        print("$", shlex.join(cmd), flush=True)
        with open(runs / log_name, "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def train_and_evaluate(runs: Path, out: Path, train_flags: list[str]) -> None:
    """Train ``out`` with the quickstart's protocol and ``train_flags`` and evaluate it on its internal test split and
    on ``external/`` (reported only), skipping what is already there."""
    train = [sys.executable, "-m", "covidxr.train", "--data", DATA, *TRAIN, *train_flags, "--out", str(out)]
    evaluate = [sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(out / "best.pt"), "--external",
                EXTERNAL, "--lung-share-limit", "40", "--bootstrap", "200"]
    run_logged(runs, f"{out.name}.log", ([] if (out / "best.pt").is_file() else [train])
               + ([] if (out / "eval" / "metrics.json").is_file() else [evaluate]))


def goals(runs: Path, rows: list[str], seeds: list[int]) -> None:
    """Train each row on all of all.csv per seed (the quickstart's protocol) and evaluate it on the internal test split
    and on ``external/`` (reported only: it chooses nothing); ``table`` collects the results."""
    for name in rows:
        for seed in seeds:
            train_and_evaluate(runs, runs / f"goal-{name}-s{seed}", ["--seed", str(seed), *ROWS[name]])


def ensemble(runs: Path, name: str, seeds: list[int]) -> None:
    """A seed ensemble of row ``name``: the row's seed-0 run of ``goals`` and further seeds trained on its patient
    split (``--split-from``), each evaluated (its own temperature), combined by ``python -m covidxr.ensemble`` and
    evaluated as the goals are."""
    first = runs / f"goal-{name}-s0"
    if not (first / "eval" / "metrics.json").is_file():
        sys.exit(f"run `goals --rows {name} --seeds 0` first: {first} is the ensemble's first member")
    members = [first]
    for seed in (s for s in seeds if s != 0):
        out = runs / f"ens-{name}-s{seed}"
        train_and_evaluate(runs, out, ["--seed", str(seed), "--split-from", str(first), *ROWS[name]])
        members.append(out)
    out = runs / f"ens-{name}"
    combine = [sys.executable, "-m", "covidxr.ensemble", *map(str, members), "--no-gate", "--out", str(out)]
    if not (out / "best.pt").is_file():
        run_logged(runs, f"{out.name}.log", [combine])
    train_and_evaluate(runs, out, [])


def result_line(label: str, seed: str, metrics: dict) -> str:
    """One row of the results table from an evaluation's ``metrics.json``."""
    ext = metrics["external"][0]
    sets = {s["name"]: s for s in metrics["covid_vs_rest"]["sets"]}
    e = sets[f"external {ext['name']}"]
    siim = next((s for n, s in sets.items() if n.startswith("internal test: SIIM")), None)
    rec = ext["metrics"]["per_class"]
    return (f"| {label} | {seed} | {e['auc']['estimate']:.3f} | {e['sensitivity']['estimate']:.2f}"
            f" / {e['specificity']['estimate']:.2f} ({metrics['covid_vs_rest']['threshold']:.3f}) | "
            f"{rec['covid']['recall']:.2f} / {rec['normal']['recall']:.2f} | "
            f"{siim['auc']['estimate'] if siim else float('nan'):.3f} | {ext['metrics']['ece']:.3f} | "
            f"{(ext.get('lung_share') or {}).get('mean') or float('nan'):.3f} |")


def table(runs: Path) -> str:
    """Every evaluated goal and ensemble run in ``runs`` as one markdown table, written to ``runs/goals.md``."""
    lines = ["| row | seed | external COVID-vs-rest AUC | external COVID sensitivity / specificity (threshold) | "
             "external recall covid / normal | siim test COVID-vs-normal AUC | external ECE | external lung share |",
             "|---|---|---|---|---|---|---|---|"]
    for name in SIMPLICITY:
        for path in sorted(runs.glob(f"goal-{name}-s*/eval/metrics.json")):
            seed = path.parent.parent.name.rsplit("-s", 1)[1]
            lines.append(result_line(LABELS[name], seed, json.loads(path.read_text())))
        for path in sorted(runs.glob(f"ens-{name}-s*/eval/metrics.json")):
            seed = path.parent.parent.name.rsplit("-s", 1)[1]
            lines.append(result_line(f"{LABELS[name]} (ensemble member)", seed, json.loads(path.read_text())))
        path = runs / f"ens-{name}" / "eval" / "metrics.json"
        if path.is_file():
            lines.append(result_line(f"{LABELS[name]}, seed ensemble", "all", json.loads(path.read_text())))
    text = "\n".join(lines) + "\n"
    (runs / "goals.md").write_text(text)
    return text


def proxy_scores(runs: Path) -> dict[str, dict]:
    """Per row: score, seed spread, worst fold and per-fold means over seeds (valid folds only)."""
    scores = {}
    for path in sorted(runs.glob("proxy-*.json")):
        content = json.loads(path.read_text())
        folds = [f for f in content["folds"] if f["valid"]]
        per_seed = [np.mean([f["balanced_accuracy"] for f in folds if f["seed"] == s]) for s in content["seeds"]]
        per_fold = {src: float(np.mean([f["balanced_accuracy"] for f in folds if f["source"] == src]))
                    for src in dict.fromkeys(f["source"] for f in folds)}
        worst = min(per_fold, key=per_fold.get)
        scores[content["row"]] = {"score": float(np.mean(per_seed)), "spread": float(np.ptp(per_seed)),
                                  "per_seed": [float(x) for x in per_seed], "per_fold": per_fold,
                                  "worst_fold": worst, "worst": per_fold[worst], "seeds": content["seeds"],
                                  "seconds": content["seconds"], "paediatric_recall": _recall(content, KERMANY)}
    return scores


def _recall(content: dict, source: str) -> dict[str, float]:
    """Mean recall per class over seeds when ``source`` is held out."""
    folds = [f for f in content["folds"] if f["source"] == source]
    classes = {c for f in folds for c, r in f["recall"].items() if r is not None}
    return {c: float(np.mean([f["recall"][c] for f in folds])) for c in sorted(classes)}


def choose_row(scores: dict[str, dict]) -> str:
    """The rule: the best score, unless a simpler row is tied with it (difference <= the larger seed spread)."""
    best = max(scores, key=lambda r: scores[r]["score"])
    tied = [r for r in scores if abs(scores[r]["score"] - scores[best]["score"])
            <= max(scores[r]["spread"], scores[best]["spread"])]
    return min(tied, key=SIMPLICITY.index)


def full_scores(runs: Path) -> dict[str, float]:
    """Balanced accuracy on the held-out siim fold of each full-protocol run present."""
    out = {}
    for name in ROWS:
        metrics = runs / f"full-siim-{name}" / "eval-heldout" / "metrics.json"
        if metrics.is_file():
            out[name] = json.loads(metrics.read_text())["metrics"]["balanced_accuracy"]
    return out


def choose(runs: Path) -> Path:
    """Apply the rule, check the proxy against the full protocol, write the results file; return its path."""
    scores = proxy_scores(runs)
    if not scores:
        sys.exit(f"no proxy results in {runs}: run the proxy step first")
    chosen = choose_row(scores)
    fulls = full_scores(runs)
    checked = [r for r in FULL_ROWS if r in fulls and r in scores]
    proxy_order = sorted(checked, key=lambda r: -scores[r]["per_fold"].get(SIIM, float("nan")))
    full_order = sorted(checked, key=lambda r: -fulls[r])
    agree = proxy_order == full_order
    if len(checked) >= 4 and not agree:  # the rule's fallback: the full protocol's siim fold decides among its rows
        chosen = full_order[0]
    lines = [f"# Recipe selection by held-out sources ({time.strftime('%Y-%m-%d')})", "",
             "Rule: docs/results.md, 'Choosing the recipe on held-out sources'. Proxy: "
             f"`python benchmarks/recipe_selection.py proxy --runs {runs}` (linear probe per fold, seeds "
             f"{scores[chosen]['seeds']}). Nothing here reads "
             "`external/`.", "",
             "| row | flags | score (mean held-out bal. acc.) | seed spread | per seed | worst fold | "
             + " | ".join(f"held out {s.split(' ')[0]}" for s in scores[chosen]["per_fold"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(scores[chosen]["per_fold"])]
    for row in sorted(scores, key=lambda r: -scores[r]["score"]):
        s = scores[row]
        mark = " **(chosen)**" if row == chosen else ""
        lines.append(f"| {LABELS[row]}{mark} | `{' '.join(ROWS[row]) or '-'}` | {s['score']:.3f} | {s['spread']:.3f} | "
                     + ", ".join(f"{x:.3f}" for x in s["per_seed"])
                     + f" | {s['worst_fold'].split(' ')[0]} {s['worst']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in s["per_fold"].values()) + " |")
    lines += ["", "Paediatric films (Kermany) held out, mean recall over seeds: " + "; ".join(
        f"{LABELS[r]}: " + ", ".join(f"{c} {v:.2f}" for c, v in scores[r]["paediatric_recall"].items())
        for r in scores)]
    lines += ["", "Full protocol on the siim fold (10-epoch fine-tune, seed 0; `python benchmarks/recipe_selection.py "
              f"full --runs {runs}`): " + (", ".join(f"{LABELS[r]} {fulls[r]:.3f}" for r in full_order) or "none"),
              f"Proxy's siim-fold order: {', '.join(proxy_order) or 'n/a'}; full protocol's: "
              f"{', '.join(full_order) or 'n/a'}; " + ("the same" if agree else "different"), "",
              f"Chosen: **{LABELS[chosen]}** (`{' '.join(ROWS[chosen])}`)."]
    path = Path(__file__).resolve().parent / "results" / f"recipe-selection-{time.strftime('%Y-%m-%d')}.md"
    path.write_text("\n".join(lines) + "\n")
    (runs / "choice.json").write_text(json.dumps({"chosen": chosen, "flags": ROWS[chosen], "scores": scores,
                                                  "full": fulls, "agree": agree}, indent=2) + "\n")
    print("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("proxy", "full", "choose", "goals", "ensemble", "tta", "table"),
                        help="what to run")
    parser.add_argument("--runs", type=Path, required=True, help="folder of the runs and their results")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), help="rows to run (default: all, or the four "
                        "checked rows for 'full')")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the proxy")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.step == "proxy":
        proxy(args.runs, args.rows or list(ROWS), args.seeds)
    elif args.step == "full":
        full(args.runs, args.rows or list(FULL_ROWS))
    elif args.step == "goals":
        chosen = json.loads((args.runs / "choice.json").read_text())["chosen"]
        goals(args.runs, args.rows or [chosen], args.seeds)
    elif args.step == "ensemble":
        chosen = json.loads((args.runs / "choice.json").read_text())["chosen"]
        ensemble(args.runs, (args.rows or [chosen])[0], args.seeds)
    elif args.step == "tta":
        choice = json.loads((args.runs / "choice.json").read_text())
        print("\n".join(tta(args.runs, args.rows or list(FULL_ROWS), choice["scores"][choice["chosen"]]["spread"])))
    elif args.step == "table":
        print(table(args.runs), end="")
    else:
        choose(args.runs)


if __name__ == "__main__":
    main()
