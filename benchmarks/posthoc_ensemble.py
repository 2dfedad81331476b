"""Average the calibrated probabilities of several evaluated runs, film by film, and score the average on one set.

A measurement, not a product path: ``python -m covidxr.ensemble`` builds a deployable ensemble only from runs that
share one input pipeline, because one upload is prepared once. Members with different pipelines (whole film and lung
crop) can still be compared on films they all evaluated, from their ``evaluate`` prediction tables:

    python benchmarks/posthoc_ensemble.py RUN_A/eval RUN_B/eval [--set external]

Prints the threshold-free figures of the average (the COVID threshold would need the members' validation
predictions, which evaluate does not write): COVID-vs-rest ROC-AUC, per-class recall, films called a class the set
does not hold, recall with the pneumonia output set aside, ECE, and the ``siim`` internal-test COVID-vs-normal AUC.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidxr.evaluation.covid_vs_rest import absent_class_calls
from covidxr.evaluation.metrics import classification_metrics

# The selection script beside this one (benchmarks/ is not a package): its siim source, contrast AUC and two-class
# recall, so that both scripts score the same way.
_spec = importlib.util.spec_from_file_location("contrast_selection", Path(__file__).with_name("contrast_selection.py"))
selection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection)


def prediction_table(folder: Path, which: str) -> pd.DataFrame:
    """One run's prediction table: ``predictions.csv`` (internal test) or its first ``predictions-external-*.csv``."""
    if which == "internal":
        return pd.read_csv(folder / "predictions.csv")
    found = sorted(folder.glob("predictions-external-*.csv"))
    if not found:
        raise SystemExit(f"{folder}: no predictions-external-*.csv (run evaluate with --external)")
    return pd.read_csv(found[0])


def averaged(tables: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    """The films every table holds, with the mean of the members' probabilities (labels must agree)."""
    base = tables[0][["path", "label", "source", *classes]].set_index("path")
    stacked = [base[classes].to_numpy()]
    for table in tables[1:]:
        other = table.set_index("path").reindex(base.index)
        if other["label"].isna().any() or (other["label"] != base["label"]).any():
            raise SystemExit("the members did not evaluate the same films with the same labels")
        stacked.append(other[classes].to_numpy())
    out = base.copy()
    out[classes] = np.mean(stacked, axis=0)
    return out.reset_index()


def scores(table: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Threshold-free figures of one averaged table."""
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = table[classes].to_numpy()
    metrics = classification_metrics(y, probs, classes)
    two = selection.two_class_recall(table)
    out = {"films": float(len(table)), "covid_vs_rest_auc": float(roc_auc_score(y == classes.index("covid"),
                                                                                 probs[:, classes.index("covid")])),
           "ece": float(metrics["ece"])}
    for c in ("covid", "normal"):
        out[f"recall_{c}"] = float(metrics["per_class"][c]["recall"])
        out[f"two_recall_{c}"] = two[c]
    out.update({f"called_{c}": float(n) for c, n in absent_class_calls(y, probs, classes).items()})
    siim = (table["source"] == selection.SIIM).to_numpy()
    if {"covid", "normal"} <= set(table.loc[siim, "label"]):
        labels = table["label"].to_numpy()[siim]
        out["siim_covid_vs_normal_auc"] = selection.contrast_auc(probs[siim], labels, classes, ("covid", "normal"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("evals", nargs="+", type=Path, help="evaluation folders (RUN/eval) of the members")
    p.add_argument("--set", choices=("external", "internal"), default="external")
    p.add_argument("--classes", nargs="+", default=["covid", "normal", "pneumonia"])
    args = p.parse_args()
    if len(args.evals) < 2:
        raise SystemExit("give at least two evaluation folders")
    table = averaged([prediction_table(f, args.set) for f in args.evals], args.classes)
    for key, value in scores(table, args.classes).items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
