"""What a cross-validation by source reports: per held-out source its metrics with patient-bootstrap intervals and the
metadata-only baselines, written as crossval.json, crossval.csv, crossval.md and one split CSV per fold."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxr.crossval.folds import CrossvalConfig, classes_missing_elsewhere, fold_name
from covidxr.evaluation.analysis import column_baseline, default_positive
from covidxr.evaluation.covid_vs_rest import covid_vs_rest
from covidxr.evaluation.heldout import flat_row, heldout_result, markdown_table, summary_columns, summary_row
from covidxr.evaluation.outputs import jsonable
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.html_page import format_value
from covidxr.utils import softmax

SPLIT_CSV_COLUMNS = ("relpath", "split", "source", "label", "patient_id")


def fold_warnings(split: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """What limits a fold's numbers: classes the training never saw, a held-out source with a single class."""
    train, test = split[split["split"] == "train"], split[split["split"] == "test"]
    out = []
    unseen = [c for c in classes if c in set(test["label"]) and c not in set(train["label"])]
    if unseen:
        out.append(f"class(es) {', '.join(unseen)} absent from training: the model cannot recall them")
    present = sorted(set(test["label"]))
    if len(present) == 1:
        out.append(f"only {present[0]!r} in the held-out source: balanced accuracy is its recall, ROC-AUC undefined")
    return out


def fold_result(held_out: str, split: pd.DataFrame, logits: np.ndarray, classes: Sequence[str],
                cfg: CrossvalConfig, best_epoch: int) -> dict[str, Any]:
    """The crossval.json entry of one held-out source.

    Args:
        held_out: The source left out of training.
        split: The fold's readable rows with their split (the held-out source is ``test``).
        logits: Logits of the test rows, in row order, ``(N_test, C)``.
        classes: Class names.
        cfg: The cross-validation settings (bootstrap, seed).
        best_epoch: The fold's best epoch (validation macro ROC-AUC).
    """
    index = {c: k for k, c in enumerate(classes)}
    test, val = split[split["split"] == "test"], split[split["split"] == "val"]
    train = split[split["split"] == "train"]
    y = test["label"].map(index).to_numpy(dtype=np.int64)
    probs, patients = softmax(logits), test["patient_id"].astype(str).tolist()
    result = heldout_result(held_out, y, probs, patients, classes, cfg.bootstrap, cfg.seed)
    result["baselines"] = {c: column_baseline(train, test, y, classes, c) for c in ("source", "view")}
    positive = default_positive(classes, None)
    if positive is not None:  # AUC only: a threshold would have to be chosen on these very folds
        result["covid_vs_rest"] = covid_vs_rest(held_out, y, probs, patients, classes, positive, None, cfg.bootstrap,
                                                cfg.seed)
    y_val = val["label"].map(index).to_numpy(dtype=np.int64)
    return {**result, "n_train": int(len(train)), "n_val": int(len(val)),
            "train_sources": train["source"].value_counts().to_dict(),
            # In-distribution reference: how much the source alone tells on the other sources' validation images.
            "source_only_on_val": column_baseline(train, val, y_val, classes, "source") if len(val) else None,
            "best_epoch": best_epoch, "split_csv": split_csv_name(held_out), "run": f"fold-{fold_name(held_out)}",
            "valid": not classes_missing_elsewhere(split, held_out), "warnings": fold_warnings(split, classes)}


def split_csv_name(held_out: str) -> str:
    return f"split-{fold_name(held_out)}.csv"


def write_split(out: Path, held_out: str, split: pd.DataFrame) -> None:
    """The fold's split as ``relpath,split,source,label,patient_id`` (every readable image, test = held-out)."""
    columns = [c for c in SPLIT_CSV_COLUMNS if c in split.columns]
    atomic_write_bytes(out / split_csv_name(held_out), split[columns].to_csv(index=False).encode("utf-8"))


def logits_csv_name(held_out: str) -> str:
    return f"heldout-logits-{fold_name(held_out)}.csv"


def write_heldout_logits(out: Path, held_out: str, split: pd.DataFrame, logits: np.ndarray,
                         classes: Sequence[str]) -> str:
    """The held-out films' logits (``relpath,source,label,patient_id,logit_<class>...``): out-of-source predictions
    that ``python -m covidxr.evaluate`` can calibrate on; return the file name."""
    test = split[split["split"] == "test"]
    frame = test[[c for c in ("relpath", "source", "label", "patient_id") if c in test.columns]].reset_index(drop=True)
    frame = pd.concat([frame, pd.DataFrame(logits, columns=[f"logit_{c}" for c in classes])], axis=1)
    name = logits_csv_name(held_out)
    atomic_write_bytes(out / name, frame.to_csv(index=False).encode("utf-8"))
    return name


def crossval_markdown(content: dict[str, Any]) -> str:
    """crossval.md: the settings, the table (one row per held-out source) and the caveats."""
    classes = content["classes"]
    rows = [summary_row(f, classes) for f in content["folds"]]
    lines = [f"# Cross-validation by {content['by']}", "",
             f"`{content['command_line']}`", "",
             f"{content['mode']} of {content['arch']} ({content['weights']} weights) at {content['img_size']} px, seed "
             f"{content['seed']}; each source with at least {content['min_images']} images is held out in turn, the "
             f"other sources split by patient into train/val "
             f"({1 - content['val_frac']:.0%}/{content['val_frac']:.0%}). "
             f"95% intervals: {content['bootstrap']} patient-bootstrap resamples. Probabilities are uncalibrated.", "",
             markdown_table(rows, summary_columns(classes, "held-out source")),
             "A source-only baseline cannot know the held-out source (never seen in training): it predicts the "
             "training prior for every image and is n/a. The view-only baseline is learned on the fold's training "
             "images.", ""]
    for fold in content["folds"]:
        ref = fold.get("source_only_on_val") or {}
        lines.append(f"- {fold['name']}: trained on {fold['n_train']} images (val {fold['n_val']}), best epoch "
                     f"{fold['best_epoch']}; source-only baseline on the validation split (seen sources): balanced "
                     f"accuracy {format_value(ref.get('balanced_accuracy'))}"
                     + "".join(f"; warning: {w}" for w in fold["warnings"]))
    if content["skipped_sources"]:
        lines.append(f"- not held out (fewer than {content['min_images']} images): "
                     + ", ".join(f"{s} ({n})" for s, n in content["skipped_sources"].items()))
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, content: dict[str, Any]) -> None:
    """crossval.json, crossval.csv and crossval.md in ``out``."""
    content = jsonable(content)
    atomic_write_text(out / "crossval.json", json.dumps(content, indent=2, allow_nan=False) + "\n")
    rows = [flat_row(summary_row(f, content["classes"])) for f in content["folds"]]
    atomic_write_bytes(out / "crossval.csv", pd.DataFrame(rows).to_csv(index=False).encode("utf-8"))
    atomic_write_text(out / "crossval.md", crossval_markdown(content))
