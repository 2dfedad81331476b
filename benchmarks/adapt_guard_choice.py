"""Choose the collapse guard's bound on choice sets that share no film with any scored set (docs/adapt.md,
"Collapse guard"): per adaptation, the guard's statistics and whether the adaptation was harmful.

Usage::

    python benchmarks/adapt_guard_choice.py --checkpoint NOSIIM/best.pt --data ../shared/data/siim --offset 400 \\
        --limit 160 --name siim
    python benchmarks/adapt_guard_choice.py --checkpoint NOSIIM/best.pt --run-split val --limit 200 --name nosiim-val
    python benchmarks/adapt_guard_choice.py --checkpoint QS/best.pt --run-split val --limit 200 --name qs-val

For each ``--depths`` value and each of ``--splits`` random patient halvings (seed 0), adapt on one half and score
the other, both ways, and print and write (``--out``, one JSON list per set) the estimated priors' shift, the adapted
model's largest share of calls, the rise of each class's share of calls over the unadapted model's on the
adaptation half (``growth``: batch-norm statistics and priors; ``growth_bn``: batch-norm statistics only, what
ships), and on the scored half the accuracy and ECE (unadapted, batch-norm only, adapted) and the COVID-vs-normal AUC
(unadapted, batch-norm only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _sibling(name: str):
    """The benchmark module ``benchmarks/NAME.py`` beside this one (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


ae = _sibling("adapt_eval")

from covidxr.adapt.estimate import AdaptSettings, em_priors, floored, mixed_bn_stats  # noqa: E402
from covidxr.adapt.site import adapted_logits  # noqa: E402
from covidxr.files import atomic_write_text  # noqa: E402
from covidxr.inference.predictor import Predictor  # noqa: E402
from covidxr.utils import softmax  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the choice set; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data")
    p.add_argument("--run-split", choices=["val", "test"])
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--splits", type=int, default=2)
    p.add_argument("--depths", type=float, nargs="+", default=[1.0])
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table_args = argparse.Namespace(checkpoint=args.checkpoint, data=args.data, run_test=False,
                                    run_split=args.run_split, limit=args.limit, offset=args.offset, seed=0)
    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu", backend="torch")
    pred.model.to(memory_format=torch.channels_last)
    films = ae.read_films(pred, ae.load_table(table_args, pred.trained))
    source, classes, temperature = ae.training_priors(pred.trained), list(pred.classes), pred.temperature
    patients = films.table["patient_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    halvings = [ae.patient_halves(patients, rng) for _ in range(args.splits)]
    rows = []
    for depth in args.depths:
        settings = AdaptSettings(depth=depth)
        for first, second in halvings:
            for adapt, score in ((first, second), (second, first)):
                use = adapt[films.accepted[adapt]]
                stats, _ = mixed_bn_stats(pred.model, films.inputs[use], settings, pred.device)
                logits = adapted_logits(pred.model, films.inputs[np.concatenate([use, score])], stats,
                                        settings.batch_size, pred.device) / temperature
                on_adapt, on_score = logits[:len(use)], logits[len(use):]
                site = floored(em_priors(softmax(on_adapt), source)[0], settings.prior_floor)
                offsets = np.log(site / source)
                calls = softmax(on_adapt + offsets).argmax(axis=1)
                counts = np.bincount(calls, minlength=len(classes))
                before = np.bincount(films.logits0[use].argmax(axis=1), minlength=len(classes))
                growth = (counts - before) / len(use)
                growth_bn = (np.bincount(on_adapt.argmax(axis=1), minlength=len(classes)) - before) / len(use)
                base = ae.metrics(films.y[score], softmax(films.logits0[score], temperature), classes, None)
                bn = ae.metrics(films.y[score], softmax(on_score), classes, None)
                both = ae.metrics(films.y[score], softmax(on_score + offsets), classes, None)
                row = {"depth": depth, "shift": 0.5 * float(np.abs(site - source).sum()),
                       "top": float(counts.max() / len(use)), "growth": [round(float(g), 3) for g in growth],
                       "growth_bn": [round(float(g), 3) for g in growth_bn],
                       "priors": [round(float(v), 3) for v in site],
                       "acc": [round(m["accuracy"], 3) for m in (base, bn, both)],
                       "ece": [round(m["ece"], 3) for m in (base, bn, both)],
                       "auc_cn": [round(m["auc_covid_vs_normal"], 3) for m in (base, bn)],
                       "pneu": [round(m.get("called_pneumonia_without", 0.0), 3) for m in (base, both)]}
                print(args.name, row, flush=True)
                rows.append(row)
    atomic_write_text(args.out / f"adapt-guard-choice-{args.name}.json", json.dumps(
        {"command": " ".join(["python", "benchmarks/adapt_guard_choice.py", *(argv or sys.argv[1:])]),
         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
