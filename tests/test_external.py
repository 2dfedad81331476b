"""``evaluate --external``: the internal test split and external folders in one call, metrics.json's "external" and
"crossval" keys, the checkpoint's external headline, and a report that puts external results first."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr.evaluation.__main__ import main
from covidxr.evaluation.heldout import ABSENT, ONE_CLASS, UNSEEN, heldout_result, summary_row
from covidxr.model.trained import TrainedModel

RUN_FILES = ("best.pt", "split.csv", "history.csv", "config.json")


def external_root(shared_data: Path) -> Path:
    """The visible external test set beside the shared training data."""
    root = shared_data.parent / "external"
    if not (root / "metadata.csv").is_file():
        pytest.fail(f"external test set not found at {root}")
    return root


def external_subset(root: Path, dest: Path, per_class: int = 4) -> Path:
    """A folder holding a manifest of ``per_class`` external images per class (absolute paths, no copies)."""
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    subset = meta.groupby("label").head(per_class).copy()
    subset["path"] = [str(root / p) for p in subset["path"]]
    dest.mkdir(parents=True)
    subset.to_csv(dest / "manifest.csv", index=False)
    return dest


def crossval_json(path: Path) -> Path:
    """A minimal crossval.json with two held-out sources (one of a single class)."""
    classes = ["covid", "normal", "pneumonia"]
    rng = np.random.default_rng(0)
    folds = []
    for name, y in (("hospital-a", np.array([1, 1, 2, 2, 1, 2])), ("hospital-b", np.zeros(5, dtype=int))):
        probs = rng.dirichlet(np.ones(3), size=len(y))
        fold = heldout_result(name, y, probs, [f"{name}-{i}" for i in range(len(y))], classes, 20, 0)
        folds.append({**fold, "warnings": []})
    content = {"by": "source", "mode": "probe", "arch": "resnet18", "img_size": 32, "seed": 0, "min_images": 5,
               "classes": classes, "folds": folds, "skipped_sources": {}}
    path.write_text(json.dumps(content, allow_nan=False))
    return path


@pytest.fixture(scope="module")
def evaluated_external(tiny_run: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("external")
    run = base / "run"
    run.mkdir()
    for name in RUN_FILES:
        shutil.copy2(tiny_run / name, run / name)
    ext = external_subset(external_root(shared_data), base / "ext-small")
    cv = crossval_json(base / "crossval.json")
    assert main(["--checkpoint", str(run / "best.pt"), "--external", str(ext), "--crossval", str(cv),
                 "--bootstrap", "50", "--workers", "0", "--batch-size", "8"]) == 0
    return {"run": run, "eval": run / "eval", "metrics": json.loads((run / "eval" / "metrics.json").read_text())}


def test_external_key_has_the_shape_of_the_top_level(evaluated_external: dict) -> None:
    m = evaluated_external["metrics"]
    assert m["split"] == "test" and m["data_is_external"] is False  # the internal test split is still evaluated
    (ext,) = m["external"]
    assert ext["name"] == "ext-small" and ext["n_images"] == 8 and ext["n_patients"] == 8
    assert ext["class_counts"] == {"covid": 4, "normal": 4, "pneumonia": 0}
    assert set(ext["metrics"]) == set(m["metrics"]) and set(ext["metrics"]["per_class"]) == set(m["classes"])
    assert set(ext["ci"]) == set(m["ci"]) and ext["ci"]["n_resamples"] == 50
    assert ext["ci"]["per_class"]["pneumonia"]["sensitivity"]["estimate"] is None  # absent class
    assert set(ext["baselines"]) == {"source", "view"}
    assert ext["baselines"]["source"]["seen_share"] == 0.0  # the external hospitals are unseen in training
    assert ext["by_source"] and set(ext["by_source"]) == {"COVID-CXNet (armiro/COVID-CXNet)",
                                                          "OpenIST teaching set (pi-null-mezon/OpenIST)"}
    cal = ext["calibration"]
    assert cal["temperature"] == pytest.approx(m["calibration"]["temperature"])  # chosen on val, reused here
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(cal)
    assert "ext-small" in cal["measured_on"]
    assert any("cannot separate disease from source" in w for w in ext["warnings"])
    pred = pd.read_csv(evaluated_external["eval"] / ext["predictions"], keep_default_na=False)
    assert len(pred) == 8 and set(pred["label"]) == {"covid", "normal"}
    assert m["crossval"]["folds"][0]["name"] == "hospital-a"


def test_checkpoint_summary_has_the_external_headline(evaluated_external: dict) -> None:
    path = evaluated_external["run"] / "best.pt"
    summary = TrainedModel.load(path, device="cpu").calibration.summary
    (head,) = summary["external"]
    ext = evaluated_external["metrics"]["external"][0]
    assert head["name"] == "ext-small" and set(head["recall"]) == {"covid", "normal"}
    assert head["balanced_accuracy"]["estimate"] == pytest.approx(ext["metrics"]["balanced_accuracy"])
    assert {"lo", "hi"} <= set(head["roc_auc_macro"])


def test_report_puts_external_and_held_out_sources_before_the_internal_split(evaluated_external: dict) -> None:
    html = (evaluated_external["eval"] / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    internal = headings.index("Internal test split: metrics")
    assert headings[:3] == ["External validation", "External: COVID-CXNet + chest X-ray teaching films",
                            "Held-out sources (cross-validation by source)"]
    assert internal > 2
    assert html.index("ext-small: balanced accuracy") < html.index("internal test: balanced accuracy")  # cards
    assert html.index("hospital-b") < html.index("<h2>Internal test split")
    assert "No external result" not in html


def test_summary_row_marks_undefined_values() -> None:
    classes = ["covid", "normal", "pneumonia"]
    result = heldout_result("h", np.zeros(4, dtype=int), np.full((4, 3), 1 / 3), ["a", "b", "c", "d"], classes, 10, 0)
    result["baselines"] = {"source": {"balanced_accuracy": 1.0, "roc_auc_macro": 0.5, "seen_share": 0.0},
                           "view": None}
    row = summary_row(result, classes)
    assert row["roc_auc_macro"] == ONE_CLASS and row["recall_normal"] == ABSENT
    assert row["recall_covid"]["estimate"] == 1.0 and row["balanced_accuracy"]["estimate"] == 1.0
    assert row["source_only_balanced_accuracy"] == UNSEEN and row["view_only_balanced_accuracy"] is None


def test_missing_external_folder_is_a_one_line_error(tiny_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["--checkpoint", str(tiny_run / "best.pt"), "--external", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "not found" in capsys.readouterr().err
