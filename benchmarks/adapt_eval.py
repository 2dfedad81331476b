"""Measure site adaptation (``python -m covidxr.adapt``) on films the adaptation never saw.

Usage::

    python benchmarks/adapt_eval.py --checkpoint RUN/best.pt --data ../shared/data/external --name external
    python benchmarks/adapt_eval.py --checkpoint NOSIIM/best.pt --data ../shared/data/siim --limit 600 --name siim
    python benchmarks/adapt_eval.py --checkpoint RUN/best.pt --run-test --name own-test      # control

Each film is decoded and prepared once. Then, for each of ``--splits`` random splits of the patients into two halves,
the model is adapted on one half's films (those the input gate accepts; labels never used) and scores the other half,
then the halves swap: every film gets one prediction from an adaptation that never saw it, per split. Five arms are
scored on the same films: unadapted, batch-norm statistics only, priors only (EM on the unadapted model), both
with the collapse guard (``--shift-priors``), and what ``covidxr.adapt`` writes by default (batch-norm statistics,
guard on; when the guard refuses, the unadapted output, as the product does). Reported per
arm: the mean over splits of per-class recall, COVID sensitivity and specificity at the operating point (the
checkpoint's COVID threshold when its calibration has one, else the arg-max), the share of films without pneumonia
called pneumonia, ECE, macro AUC and COVID-vs-normal AUC, with a patient-level paired bootstrap 95% interval of each
difference to unadapted (the same resampled patients for both arms, averaged over the splits). ``--sizes`` adds a
curve: adapt on that many films of one half, score the other half (``--curve-splits`` splits each). ``--time N``
times ``covidxr.adapt`` end to end (reading, gate, estimation, writing) on N films.

The settings are :class:`covidxr.adapt.estimate.AdaptSettings`'s defaults, fixed before any of these runs.
Results go to ``--out`` (default ``benchmarks/results/adapt-NAME.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidxr.adapt.estimate import AdaptSettings, collapse_reason, em_priors, floored, mixed_bn_stats, source_priors
from covidxr.adapt.site import adapt_site, adapted_logits
from covidxr.data.manifest import load_manifest
from covidxr.data.run_folder import RunFolder
from covidxr.evaluation.arrays import binary_auc
from covidxr.evaluation.bootstrap import bootstrap_draws
from covidxr.evaluation.calibration import expected_calibration_error
from covidxr.files import atomic_write_text
from covidxr.images.reader import load_xray
from covidxr.inference.predictor import Predictor
from covidxr.model.site_profile import site_gate
from covidxr.model.trained import TrainedModel
from covidxr.utils import softmax

ARMS = ("unadapted", "bn", "priors", "bn+priors", "adapted")


def training_priors(trained: TrainedModel) -> np.ndarray:
    """The class priors of the model's training split (what :func:`covidxr.adapt.estimate.source_priors` reads)."""
    return source_priors(trained.classes, trained.config, trained.record.get("split"))


@dataclass
class Films:
    """Every evaluated film, prepared once."""

    table: pd.DataFrame  # path, label, patient_id
    y: np.ndarray  # (N,) class indices
    inputs: torch.Tensor  # (N, 1, S, S)
    logits0: np.ndarray  # (N, C) unadapted logits
    accepted: np.ndarray  # (N,) the input gate accepts the film
    features: np.ndarray | None = None  # (N, F) the unadapted model's pooled features (what the gate reads)


def read_films(predictor: Predictor, table: pd.DataFrame, batch: int = 16) -> Films:
    """Decode, prepare and gate every film; the unadapted logits come from the calibrated probabilities."""
    inputs, logits, accepted = [], [], []
    for start in range(0, len(table), batch):
        xrays = [load_xray(p, name="") for p in table["path"].iloc[start:start + batch]]
        for xray, result in zip(xrays, predictor.predict_batch(xrays, cam=None), strict=True):
            inputs.append(predictor.pipeline.network_input(xray.pixels, predictor.preprocess.img_size)[0])
            logits.append(np.log(np.clip([result.probs[c] for c in predictor.classes], 1e-300, None)))
            accepted.append(result.assessable)
    index = {c: i for i, c in enumerate(predictor.classes)}
    stacked = torch.stack(inputs)
    features = None
    if predictor.gate.learned and predictor.gate.ood is not None:
        with torch.inference_mode():
            features = torch.cat([predictor.model.features(stacked[i:i + batch]).float()
                                  for i in range(0, len(stacked), batch)]).numpy()
    return Films(table.reset_index(drop=True), table["label"].map(index).to_numpy(), stacked,
                 np.array(logits) * predictor.temperature, np.array(accepted), features)


def gate_band(predictor: Predictor, films: Films, adapt: np.ndarray, score: np.ndarray) -> dict[str, int]:
    """How many of the ``score`` films the gate's learned checks put in the borderline band ("read with care") or
    refuse as out of distribution, with the training reference and with the ``adapt`` films it accepts added to it
    (:func:`covidxr.model.site_profile.site_gate`)."""
    gate = predictor.gate
    site = site_gate(gate, films.features[adapt[films.accepted[adapt]]])
    x = films.features[score]
    return {"scored": int(len(score)), "borderline_before": int(gate.borderline(x).sum()),
            "borderline_after": int(site.borderline(x).sum()), "refused_before": int(gate.refused(x).sum()),
            "refused_after": int(site.refused(x).sum())}


def adapt_arms(predictor: Predictor, films: Films, adapt: np.ndarray, score: np.ndarray, source: np.ndarray,
               settings: AdaptSettings) -> dict[str, np.ndarray]:
    """Probabilities of the ``score`` films under each arm, adapted on the ``adapt`` films the gate accepts."""
    temperature, classes = predictor.temperature, predictor.classes
    use = adapt[films.accepted[adapt]]
    stats, _ = mixed_bn_stats(predictor.model, films.inputs[use], settings, predictor.device)
    both = np.concatenate([use, score])
    logits = adapted_logits(predictor.model, films.inputs[both], stats, settings.batch_size, predictor.device)
    bn_adapt, bn_score = logits[:len(use)] / temperature, logits[len(use):] / temperature
    out = {"unadapted": softmax(films.logits0[score], temperature), "bn": softmax(bn_score)}
    prior_only = floored(em_priors(softmax(films.logits0[use], temperature), source)[0], settings.prior_floor)
    out["priors"] = softmax(films.logits0[score] / temperature + np.log(prior_only / source))
    site = floored(em_priors(softmax(bn_adapt), source)[0], settings.prior_floor)
    unadapted = films.logits0[use].argmax(axis=1)
    shipped = None
    for arm, shift in (("bn+priors", True), ("adapted", settings.shift_priors)):
        offsets = np.log(site / source) if shift else np.zeros(len(classes))
        calls = softmax(bn_adapt + offsets).argmax(axis=1)
        refused = collapse_reason(calls, len(classes), site, source, list(classes), settings, unadapted)
        out[arm] = out["unadapted"] if refused else softmax(bn_score + offsets)
        if arm == "adapted":
            shipped = calls, refused
    calls, refused = shipped
    out["_refused"] = np.array([refused is not None])
    counts = np.bincount(calls, minlength=len(classes))
    growth = (counts - np.bincount(unadapted, minlength=len(classes))) / max(len(calls), 1)
    out["_guard"] = {"prior_shift": 0.5 * float(np.abs(site - source).sum()), "call_growth": float(growth.max()),
                     "top_share": float(counts.max() / max(len(calls), 1)), "top_class": classes[int(counts.argmax())],
                     "site_priors": [float(v) for v in site], "refused": refused, "n_adapt": int(len(use))}
    return out


def patient_halves(patients: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two halves of the patients, drawn at random."""
    ids = np.unique(patients)
    chosen = set(rng.permutation(ids)[: len(ids) // 2].tolist())
    first = np.array([p in chosen for p in patients])
    return np.flatnonzero(first), np.flatnonzero(~first)


def metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None) -> dict[str, float]:
    """The reported numbers of one set of predictions (NaN where undefined)."""
    calls = probs.argmax(axis=1)
    out = {f"recall_{c}": float((calls[y == k] == k).mean()) for k, c in enumerate(classes) if (y == k).any()}
    out["accuracy"] = float((calls == y).mean())
    k = classes.index("covid") if "covid" in classes else 0
    positive = probs[:, k] >= threshold if threshold is not None else calls == k
    out["sensitivity"] = float(positive[y == k].mean()) if (y == k).any() else np.nan
    out["specificity"] = float((~positive[y != k]).mean()) if (y != k).any() else np.nan
    if "pneumonia" in classes:
        p = classes.index("pneumonia")
        out["called_pneumonia_without"] = float((calls[y != p] == p).mean())
    out["ece"] = float(expected_calibration_error(y, probs))
    present = [c for c in range(len(classes)) if 0 < (y == c).sum() < len(y)]
    out["auc_macro"] = float(np.mean([binary_auc(y == c, probs[:, c]) for c in present])) if present else np.nan
    if "normal" in classes:
        n = classes.index("normal")
        pair = (y == k) | (y == n)
        out["auc_covid_vs_normal"] = binary_auc(y[pair] == k, probs[pair, k] / (probs[pair, k] + probs[pair, n]))
    return out


def paired_intervals(y: np.ndarray, patients: np.ndarray, base: np.ndarray, arm: list[np.ndarray],
                     classes: list[str], threshold: float | None, n_boot: int, seed: int) -> dict[str, list[float]]:
    """95% patient-bootstrap interval of (mean over splits of the arm's metric) - (unadapted metric)."""
    draws, _ = bootstrap_draws(patients, len(y), n_boot, seed)
    diffs: dict[str, list[float]] = {}
    for idx in draws:
        ref = metrics(y[idx], base[idx], classes, threshold)
        per_split = [metrics(y[idx], probs[idx], classes, threshold) for probs in arm]
        for key, value in ref.items():
            if key not in per_split[0]:
                continue
            diffs.setdefault(key, []).append(float(np.nanmean([m[key] for m in per_split])) - value)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in diffs.items()}


def evaluate_splits(predictor: Predictor, films: Films, args: argparse.Namespace, source: np.ndarray,
                    threshold: float | None) -> dict:
    """Adapt on one half, score the other, swap, over ``args.splits`` splits; means and paired intervals."""
    classes = list(predictor.classes)
    settings = AdaptSettings()
    rng = np.random.default_rng(args.seed)
    patients = films.table["patient_id"].astype(str).to_numpy()
    per_arm: dict[str, list[np.ndarray]] = {a: [] for a in ARMS}
    refused = 0
    guards: list[dict] = []
    bands: list[dict] = []
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
    for _ in range(args.splits):
        if time.monotonic() > deadline:
            break  # reported with the number of splits done
        first, second = patient_halves(patients, rng)
        probs = {a: np.zeros((len(films.y), len(classes))) for a in ARMS}
        for adapt, score in ((first, second), (second, first)):
            arms = adapt_arms(predictor, films, adapt, score, source, settings)
            refused += int(arms.pop("_refused")[0])
            guard = arms.pop("_guard")
            base = metrics(films.y[score], arms["unadapted"], classes, threshold)
            both = metrics(films.y[score], arms["adapted"], classes, threshold)
            guard["scored_half"] = {k: {"unadapted": base[k], "adapted": both[k]} for k in base}
            guards.append(guard)
            if films.features is not None:
                bands.append(gate_band(predictor, films, adapt, score))
            for a in ARMS:
                probs[a][score] = arms[a]
        for a in ARMS:
            per_arm[a].append(probs[a])
        partial = {a: pd.DataFrame([metrics(films.y, p, classes, threshold) for p in per_arm[a]]).mean().to_dict()
                   for a in ARMS}  # written after every split, so a long run can be read while it goes on
        atomic_write_text(args.out / f"adapt-{args.name}.partial.json", json.dumps(
            {"splits_done": len(per_arm["unadapted"]), "adaptations_refused": refused, "mean": partial},
            indent=2, default=float) + "\n")
    base = per_arm["unadapted"][0]
    result = {"splits": len(per_arm["unadapted"]), "splits_asked": args.splits, "adaptations_refused": refused,
              "guard": guards, "arms": {}}
    if bands:
        result["gate_band"] = {"per_adaptation": bands, "total": pd.DataFrame(bands).sum().to_dict()}
    for a in ARMS:
        means = pd.DataFrame([metrics(films.y, p, classes, threshold) for p in per_arm[a]]).mean().to_dict()
        entry = {"mean": means}
        if a != "unadapted" and args.bootstrap:
            entry["diff_ci95"] = paired_intervals(films.y, patients, base, per_arm[a], classes, threshold,
                                                  args.bootstrap, args.seed)
        result["arms"][a] = entry
    return result


def curve(predictor: Predictor, films: Films, args: argparse.Namespace, source: np.ndarray,
          threshold: float | None) -> list[dict]:
    """Adapt on n films of one half, score the other half, for each n of ``args.sizes``."""
    classes = list(predictor.classes)
    rng = np.random.default_rng(args.seed + 1)
    patients = films.table["patient_id"].astype(str).to_numpy()
    rows = []
    for n in args.sizes:
        found = []
        for _ in range(args.curve_splits):
            first, second = patient_halves(patients, rng)
            pool = first[films.accepted[first]]
            if len(pool) < n:
                break
            arms = adapt_arms(predictor, films, rng.choice(pool, n, replace=False), second, source, AdaptSettings())
            base = metrics(films.y[second], arms["unadapted"], classes, threshold)
            done = metrics(films.y[second], arms["adapted"], classes, threshold)
            bn = metrics(films.y[second], arms["bn"], classes, threshold)
            found.append({k: done[k] - base[k] for k in base} | {f"adapted_{k}": v for k, v in done.items()}
                         | {f"bn_{k}": v for k, v in bn.items()} | {f"unadapted_{k}": v for k, v in base.items()}
                         | {"refused_share": float(arms["_refused"][0])})
        rows.append({"n": n, "splits": len(found), **(pd.DataFrame(found).mean().to_dict() if found else
                                                       {"note": "a half has fewer accepted films"})})
    return rows


def timing(checkpoint: Path, films: Films, n: int) -> dict:
    """Seconds of ``covidxr.adapt`` (read, gate, estimate, write) on ``n`` films linked into a folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "site"
        folder.mkdir()
        for i, path in enumerate(films.table["path"].iloc[:n]):
            (folder / f"{i:04d}{Path(path).suffix}").symlink_to(Path(path).resolve())
        start, cpu = time.perf_counter(), time.process_time()
        profile = adapt_site(checkpoint, folder, "timing", Path(tmp) / "profile", "cpu",
                             AdaptSettings(max_class_share=1.0, max_prior_shift=1.0, min_films=min(n, 20)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    load = os.getloadavg()[0]
    return {"films": n, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "load_average_1min": load,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "accepted": profile.record["n_films"]}


def load_table(args: argparse.Namespace, trained: TrainedModel) -> pd.DataFrame:
    """The evaluated films: a folder or manifest, or the checkpoint's own test split; ``--limit`` patients drawn."""
    table = load_manifest(args.data or trained.config.get("data"))
    if args.run_test or args.run_split:
        split = RunFolder.of(trained).require_split()
        part = args.run_split or "test"
        table = table[table["relpath"].isin(split.loc[split["split"] == part, "relpath"])]
    table = table.assign(patient_id=table["patient_id"].replace("", np.nan).fillna(table["path"]))
    if args.limit and table["patient_id"].nunique() > args.limit or args.offset:
        drawn = np.random.default_rng(args.seed).permutation(table["patient_id"].unique())
        keep = drawn[args.offset: args.offset + args.limit if args.limit else None]
        table = table[table["patient_id"].isin(keep)]
    return table[["path", "label", "patient_id"]].reset_index(drop=True)


def markdown(report: dict) -> str:
    """The report as tables."""
    lines = [f"# Site adaptation: {report['name']}", "", f"`{report['command']}`", "",
             f"{report['n_films']} films ({report['n_accepted']} accepted by the gate), "
             f"{report['n_patients']} patients; checkpoint {report['checkpoint_sha256'][:12]}; "
             f"COVID threshold {report['threshold']}", ""]
    keys = []
    if report.get("halves"):
        arms = report["halves"]["arms"]
        keys = list(arms["unadapted"]["mean"])
        shown = [a for a in ARMS if a in arms]
        lines += ["| metric | " + " | ".join(shown) + " | adapted - unadapted, 95% CI | bn - unadapted, 95% CI |",
                  "|---" * (len(shown) + 3) + "|"]
        for k in keys:
            cis = [arms[a].get("diff_ci95", {}).get(k) for a in ("adapted", "bn")]
            lines.append(f"| {k} | " + " | ".join(f"{arms[a]['mean'][k]:.3f}" for a in shown) + " | "
                         + " | ".join(f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "" for ci in cis) + " |")
        lines += ["", f"Adaptations refused by the guard: {report['halves']['adaptations_refused']} of "
                      f"{2 * report['halves']['splits']}", ""]
        band = report["halves"].get("gate_band", {}).get("total")
        if band:
            lines += [f"Gate, summed over the adaptations: of {band['scored']} scored films, "
                      f"{band['borderline_before']} in the \"read with care\" band with the training reference, "
                      f"{band['borderline_after']} with the adaptation half's accepted films added to it; refused as "
                      f"out of distribution {band['refused_before']} -> {band['refused_after']}", ""]
    if report.get("curve"):
        keys = [k for k in report["curve"][0] if k not in ("n", "splits", "note", "refused_share")
                and not k.startswith(("adapted_", "bn_", "unadapted_"))]
        lines += ["| adaptation films | splits | " + " | ".join(f"Δ {k}" for k in keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        for row in report["curve"]:
            lines.append(f"| {row['n']} | {row['splits']} | "
                         + " | ".join(f"{row[k]:+.3f}" if k in row else "n/a" for k in keys) + " |")
    if report.get("timing"):
        lines += ["", f"Timing: {report['timing']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", help="labelled folder or manifest to split (with --run-test: the run's training data, "
                   "by default the one its config names)")
    p.add_argument("--run-test", action="store_true", help="the checkpoint's own test split (the control)")
    p.add_argument("--run-split", choices=["val", "test"], help="the checkpoint's own validation or test split "
                   "(--run-test is --run-split test; the validation split is where the guard's bounds are chosen)")
    p.add_argument("--name", required=True)
    p.add_argument("--limit", type=int, default=0, help="at most this many patients, drawn at random")
    p.add_argument("--offset", type=int, default=0, help="with --limit: skip this many patients of the random draw "
                   "first (--offset 600 --limit 200 takes 200 patients disjoint from --limit 600's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core CPU one "
                   "thread is several times faster than two; the results do not depend on it)")
    p.add_argument("--splits", type=int, default=20, help="random patient splits (0: only the curve and timing)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=0,
                   help="start no new split after this many minutes (0: no limit); the report says how many ran")
    p.add_argument("--sizes", type=int, nargs="*", default=[])
    p.add_argument("--curve-splits", type=int, default=5)
    p.add_argument("--time", type=int, default=0, help="time covidxr.adapt on this many films (0: no timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.run_test and not args.run_split and not args.data:
        p.error("--data or --run-test")
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", backend="torch")
    predictor.model.to(memory_format=torch.channels_last)  # as covidxr.adapt does on a CPU
    evaluation = predictor.metrics or {}
    threshold = (evaluation.get("covid_vs_rest") or {}).get("threshold")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    films = read_films(predictor, load_table(args, predictor.trained))
    source = training_priors(predictor.trained)
    report = {"name": args.name, "command": " ".join(["python", "benchmarks/adapt_eval.py", *(argv or sys.argv[1:])]),
              "checkpoint_sha256": predictor.checkpoint_sha256, "n_films": len(films.y),
              "n_accepted": int(films.accepted.sum()), "n_patients": int(films.table["patient_id"].nunique()),
              "threshold": threshold, "settings": AdaptSettings().to_dict(), "source_priors": source.tolist(),
              "labels": films.table["label"].value_counts().to_dict()}
    report["halves"] = evaluate_splits(predictor, films, args, source, threshold) if args.splits else None
    report["curve"] = curve(predictor, films, args, source, threshold) if args.sizes else []
    report["timing"] = timing(args.checkpoint, films, args.time) if args.time else None
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"adapt-{args.name}.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(args.out / f"adapt-{args.name}.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
