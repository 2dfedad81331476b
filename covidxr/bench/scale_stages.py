"""The data stages that ``python -m covidxr.bench scale`` times, each run alone in a child process.

Every stage reads what the earlier ones wrote below the work folder of one dataset size and writes its own output
there, through the same functions (mostly the same command lines) a user runs:

==========  ==============================================================================================
manifest    ``python -m covidxr.data prepare csv``, then the manifest loaded and validated as training does
audit       ``python -m covidxr.data audit`` (every file read, SHA-256, dHash, near-duplicate search)
split       the patient-level split (``make_split``: every file's bytes hashed) and ``split.csv``
decode      ``python -m covidxr.prepare`` (the decode-once cache)
loader      one training epoch of the training ``DataLoader`` (cache read back, augmentation, no model)
evaluate    evaluate's metrics on N synthetic predictions: temperature, point metrics, patient bootstrap,
            per-source and per-view metrics, operating points; ``metrics.json`` and ``predictions.csv``
readback    the evaluation read back as the app does (``load_evaluation``, its tables, the model view's reader)
==========  ==============================================================================================
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from covidxr.data.__main__ import main as data_cli
from covidxr.data.cache import fill_cache
from covidxr.data.dataset import XrayDataset
from covidxr.data.manifest import class_names, load_manifest, validate_for_training
from covidxr.data.split import apply_split, check_no_leakage, make_split, save_split
from covidxr.evaluation.bootstrap import bootstrap_ci
from covidxr.evaluation.calibration import fit_temperature
from covidxr.evaluation.metrics import classification_metrics, group_metrics
from covidxr.evaluation.operating_points import operating_points
from covidxr.evaluation.outputs import jsonable
from covidxr.evaluation.records import evaluation_record
from covidxr.evaluation.results import (
    example_rows,
    group_table,
    headline_table,
    load_evaluation,
    per_class_table,
    record_json,
)
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.preprocessing.transforms import cache_size, train_transform
from covidxr.training import cache_command as prepare_cli
from covidxr.utils import softmax

REPO = Path(__file__).resolve().parents[2]
STAGES = ("manifest", "audit", "split", "decode", "loader", "evaluate", "readback")


def paths(work: Path) -> SimpleNamespace:
    """Where the stages of one dataset size read and write, below its work folder."""
    return SimpleNamespace(dataset=work / "data" / "manifest.csv", manifest=work / "out" / "manifest.csv",
                           audit=work / "out" / "audit", split=work / "out" / "split.csv", cache=work / "out" / "cache",
                           eval=work / "run" / "eval", run=work / "run")


def _quiet(fn: Callable[[], int]) -> tuple[int, str]:
    """Run a command-line ``main`` with its stdout captured; return its status and output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = fn()
    return status, buffer.getvalue()


def stage_manifest(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    status, text = _quiet(lambda: data_cli(["prepare", "csv", "--src", str(p.dataset), "--out", str(p.manifest)]))
    table = load_manifest(p.manifest)
    validate_for_training(table, str(p.manifest))
    return {"status": status, "images": len(table), "patients": int(table["patient_id"].nunique()),
            "sources": int(table["source"].nunique()), "output": str(p.manifest), "says": text.splitlines()[:1]}


def stage_audit(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    status, _ = _quiet(lambda: data_cli(["audit", str(p.manifest), "--out", str(p.audit),
                                         "--workers", str(max(1, spec["workers"]))]))
    result = json.loads((p.audit / "audit.json").read_text())
    return {"status": status, "images": result["n_images"], "output": str(p.audit),
            "exact_duplicates": result["exact_duplicates"]["summary"]["total"],
            "near_duplicates": result["near_duplicates"]["summary"]["total"],
            "near_duplicates_across_patients": result["near_duplicates"]["summary"]["cross_patient_id"]}


def stage_split(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    table = make_split(load_manifest(p.manifest), seed=spec["seed"])
    check_no_leakage(table)
    save_split(table, p.split)
    return {"images": len(table), "output": str(p.split), **table["split"].value_counts().to_dict()}


def stage_decode(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    argv = ["--data", str(p.manifest), "--img-size", str(spec["img_size"]), "--cache-dir", str(p.cache),
            "--workers", str(spec["workers"])]
    status, text = _quiet(lambda: prepare_cli.main(argv))
    return {"status": status, "entries": sum(1 for _ in p.cache.glob("*.npy")), "output": str(p.cache),
            "says": text.strip()}


def stage_loader(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    table = apply_split(load_manifest(p.manifest), p.split)
    train = table[table["split"] == "train"].reset_index(drop=True)
    classes = class_names(table)
    size = cache_size(spec["img_size"])
    images = fill_cache(train["path"].tolist(), size, p.cache, workers=spec["workers"], progress=False).images
    dataset = XrayDataset(train["path"].tolist(), [classes.index(c) for c in train["label"]], size,
                          train_transform(spec["img_size"]), images)
    sampler = RandomSampler(range(len(dataset)), generator=torch.Generator().manual_seed(spec["seed"]))
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, spec["batch_size"], drop_last=True),
                        num_workers=spec["workers"], generator=torch.Generator().manual_seed(spec["seed"]))
    seen = batches = 0
    start = time.perf_counter()
    for batch, *_ in loader:
        seen += len(batch)
        batches += 1
    return {"images": seen, "batches": batches, "img_per_s": round(seen / (time.perf_counter() - start), 1)}


def synthetic_logits(y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Logits of a fair classifier (about 80 % accurate), one row per image."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (len(y), n_classes))
    logits[np.arange(len(y)), y] += 1.8
    return logits


def stage_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    table = apply_split(load_manifest(p.manifest), p.split)
    classes = class_names(table)
    y = table["label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    logits = synthetic_logits(y, len(classes), spec["seed"])
    val = (table["split"] == "val").to_numpy()
    temperature = fit_temperature(logits[val], y[val])
    raw, probs = softmax(logits), softmax(logits, temperature)
    k = classes.index("covid") if "covid" in classes else 0
    metrics, uncalibrated = classification_metrics(y, probs, classes), classification_metrics(y, raw, classes)
    result = {
        "split": "all", "n_images": len(y), "n_patients": int(table["patient_id"].nunique()), "classes": classes,
        "checkpoint_sha256": "synthetic", "metrics": metrics,
        "metrics_uncalibrated": uncalibrated,
        "ci": bootstrap_ci(y, probs, table["patient_id"].tolist(), classes, spec["bootstrap"], spec["seed"]),
        "calibration": {"temperature": temperature, "how": "fitted on the synthetic validation split",
                        "ece_before": uncalibrated["ece"], "ece_after": metrics["ece"],
                        "brier_before": uncalibrated["brier"], "brier_after": metrics["brier"], "n_bins": 15,
                        "measured_on": "all"},
        "operating_points": {"positive": classes[k], "chosen_on": "val",
                             "points": operating_points(y[val] == k, probs[val, k], y == k, probs[:, k])},
        "by_source": group_metrics(y, probs, classes, table["source"].tolist()),
        "by_view": group_metrics(y, probs, classes, table["view"].replace("", "(unknown)").tolist()),
    }
    frame = table[["relpath", "patient_id", "source", "view", "split", "label"]].copy()
    frame["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
    for i, name in enumerate(classes):
        frame[name] = probs[:, i]
        frame[f"raw_{name}"] = raw[:, i]
    atomic_write_bytes(p.eval / "predictions.csv", frame.to_csv(index=False).encode("utf-8"))
    content = record_json(evaluation_record(jsonable(result)))  # the file covidxr.evaluate would write
    atomic_write_text(p.eval / "metrics.json", json.dumps(content, indent=2) + "\n")
    return {"images": len(y), "bootstrap": spec["bootstrap"], "output": str(p.eval),
            "accuracy": round(result["metrics"]["accuracy"], 3)}


def _app_views() -> tuple[Any, Any]:
    """The app's evaluation reader and tables (imported late: they import streamlit)."""
    import app.eval_tables as app_eval_tables  # noqa: PLC0415
    import app.evaluation as app_evaluation  # noqa: PLC0415

    return app_evaluation, app_eval_tables


def stage_readback(spec: dict[str, Any]) -> dict[str, Any]:
    p = paths(Path(spec["work"]))
    reader, view = spec["_app_view"]
    metrics, predictions, folder = load_evaluation(p.run)
    tables = [headline_table(metrics), per_class_table(metrics), group_table(metrics.by_source),
              example_rows(predictions)]
    predictor = SimpleNamespace(checkpoint_path=p.run / "best.pt", metrics=None, checkpoint_sha256="synthetic")
    evaluation = reader.load_evaluation(predictor)
    tables += [view.per_class_table(evaluation.record), view.confusion_table(evaluation.record)]
    return {"rows": len(predictions), "tables": len(tables), "app_notes": len(evaluation.notes), "folder": str(folder)}


STAGE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "manifest": stage_manifest, "audit": stage_audit, "split": stage_split, "decode": stage_decode,
    "loader": stage_loader, "evaluate": stage_evaluate, "readback": stage_readback,
}


def run_stage(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in this process and return what it did, with its seconds and the memory this process held
    before it started (imports excluded from both)."""
    if name == "readback":
        with contextlib.redirect_stderr(io.StringIO()):  # streamlit warns that no app is running
            spec = {**spec, "_app_view": _app_views()}
    baseline = pss_mb(os.getpid())
    start = time.perf_counter()
    out = STAGE_FUNCTIONS[name](spec)
    return {"stage": name, "seconds": time.perf_counter() - start, "baseline_mb": round(baseline, 1), **out}


def pss_mb(pid: int) -> float:
    """Proportional set size of one process in MB (its RSS where smaps_rollup is not readable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0


