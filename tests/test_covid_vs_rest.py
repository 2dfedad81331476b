"""COVID or not: the binary score's AUC, sensitivity and specificity at a threshold fixed before testing, the
threshold's choice (Youden's J), what absent classes took, fold validity, and calibration on held-out sources."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from covidxr.crossval.folds import classes_missing_elsewhere
from covidxr.crossval.results import write_heldout_logits
from covidxr.evaluation.covid_vs_rest import (
    absent_class_calls,
    choose_threshold,
    covid_vs_rest,
    internal_sets,
    youden_threshold,
)
from covidxr.evaluation.heldout_calibration import load_heldout_logits, recipe_mismatch

CLASSES = ["covid", "normal", "pneumonia"]


def probs_of(covid: list[float]) -> np.ndarray:
    """Three-class probabilities with the given COVID probability, the rest split between the other two."""
    c = np.asarray(covid)
    return np.stack([c, (1 - c) * 0.7, (1 - c) * 0.3], axis=1)


def test_hand_example() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])  # three COVID films, three others
    probs = probs_of([0.9, 0.6, 0.3, 0.4, 0.2, 0.1])
    res = covid_vs_rest("set", y, probs, list("abcdef"), CLASSES, "covid", 0.5, 0, 0)
    # pairs (covid, other) ranked right: 0.9 > all 3, 0.6 > all 3, 0.3 > 0.2, 0.1 -> 8 of 9
    assert res["auc"]["estimate"] == pytest.approx(8 / 9)
    assert res["sensitivity"]["estimate"] == pytest.approx(2 / 3) and res["specificity"]["estimate"] == 1.0
    assert (res["n_positive"], res["n_negative"], res["threshold"]) == (3, 3, 0.5) and res["auc"]["lo"] is None


def test_intervals_cover_the_estimate_and_single_class_has_no_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = probs_of(np.clip(0.5 + 0.3 * (y == 0) + rng.normal(0, 0.2, 200), 0, 1))
    res = covid_vs_rest("set", y, probs, [str(i // 2) for i in range(200)], CLASSES, "covid", 0.6, 200, 1)
    for key in ("auc", "sensitivity", "specificity"):
        assert res[key]["lo"] <= res[key]["estimate"] <= res[key]["hi"]
    only_covid = covid_vs_rest("set", np.zeros(5, int), probs[:5], list("abcde"), CLASSES, "covid", 0.6, 20, 1)
    assert only_covid["auc"]["estimate"] is None and only_covid["specificity"]["estimate"] is None


def test_youden_threshold_separates_perfectly_separable_scores() -> None:
    y = np.array([1, 1, 0, 0, 0])
    t = youden_threshold(y, np.array([0.8, 0.7, 0.4, 0.3, 0.1]))
    assert 0.4 < t <= 0.7
    assert youden_threshold(np.ones(3, bool), np.ones(3)) is None


def test_threshold_choice_prefers_new_data_then_the_stored_one() -> None:
    stored = {"threshold": 0.42, "chosen_on": "held-out folds"}
    t, where = choose_threshold(np.array([1, 0]), np.array([0.9, 0.2]), stored, "validation")
    assert 0.2 < t <= 0.9 and "validation" in where
    assert choose_threshold(None, None, stored, "") == (0.42, "held-out folds")
    assert choose_threshold(None, None, None, "")[0] is None


def test_internal_sets_add_each_source_with_both_kinds_of_film() -> None:
    table = pd.DataFrame({"patient_id": list("abcdef"), "source": ["siim"] * 4 + ["nih"] * 2})
    y = np.array([0, 1, 0, 1, 1, 2])
    sets = internal_sets(table, y, probs_of([0.9, 0.2, 0.8, 0.3, 0.4, 0.1]), CLASSES, "covid", 0.5, 0, 0, "test")
    assert [s["name"] for s in sets] == ["internal test", "internal test: siim"]  # nih has no COVID film
    assert sets[1]["auc"]["estimate"] == 1.0


def test_absent_class_calls_count_what_a_missing_class_took() -> None:
    y = np.array([0, 0, 1, 1])  # no pneumonia film
    probs = np.array([[0.2, 0.1, 0.7], [0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])
    assert absent_class_calls(y, probs, CLASSES) == {"pneumonia": 2}


def test_a_fold_is_valid_only_when_its_classes_are_trained_elsewhere() -> None:
    table = pd.DataFrame({"source": ["a", "a", "b", "c"], "label": ["covid", "normal", "covid", "pneumonia"]})
    assert classes_missing_elsewhere(table, "a") == ["normal"]
    assert classes_missing_elsewhere(table, "b") == []


def test_heldout_logits_calibrate_only_the_same_recipe(tmp_path) -> None:
    split = pd.DataFrame({"relpath": ["x.png", "y.png", "z.png"], "split": ["test", "test", "train"],
                          "source": ["s", "s", "t"], "label": ["covid", "normal", "covid"],
                          "patient_id": ["p", "q", "r"]})
    name = write_heldout_logits(tmp_path, "s", split, np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), CLASSES)
    crossval = {"mode": "finetune", "arch": "resnet18", "img_size": 64, "lung_crop": False, "equalize": "none",
                "classes": CLASSES, "file": str(tmp_path / "crossval.json"),
                "folds": [{"name": "s", "valid": True, "logits_csv": name}]}
    config = {"arch": "resnet18", "img_size": 64}
    heldout, why = load_heldout_logits(crossval, config, CLASSES)
    assert why == "" and heldout.y.tolist() == [0, 1] and heldout.logits[0, 0] == 2.0
    assert "probe" in recipe_mismatch({**crossval, "mode": "probe"}, config)
    assert "equalize" in load_heldout_logits({**crossval, "equalize": "hist"}, config, CLASSES)[1]
    assert load_heldout_logits(None, config, CLASSES)[0] is None
    json.dumps(crossval)  # the record is plain JSON, as crossval.json stores it


def test_evaluate_calibrates_on_held_out_sources_of_the_same_recipe(tiny_run, tmp_path) -> None:
    import shutil

    from covidxr.evaluation.__main__ import main
    from covidxr.evaluation.heldout import heldout_result
    from covidxr.evaluation.outputs import jsonable
    from covidxr.model.checkpoint import load_checkpoint
    from covidxr.utils import softmax

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*"))
    config = load_checkpoint(run / "best.pt")["config"]
    folder = run / "crossval"
    folder.mkdir()
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = 4.0 * np.eye(3)[y] + rng.normal(0, 3.0, (60, 3))  # overconfident and often wrong: T > 1
    split = pd.DataFrame({"relpath": [f"{i}.png" for i in range(60)], "split": "test", "source": "elsewhere",
                          "label": [CLASSES[k] for k in y], "patient_id": [str(i) for i in range(60)]})
    name = write_heldout_logits(folder, "elsewhere", split, logits, CLASSES)
    fold = heldout_result("elsewhere", y, softmax(logits), split["patient_id"].tolist(), CLASSES, 0, 0)
    (folder / "crossval.json").write_text(json.dumps(jsonable({
        "by": "source", "mode": "finetune", "classes": CLASSES, "min_images": 30, "seed": 0,
        **{k: config.get(k) for k in ("arch", "img_size", "lung_crop", "lung_mask", "equalize", "balance")},
        "folds": [{**fold, "valid": True, "logits_csv": name, "warnings": []}]})))
    assert main(["--checkpoint", str(run / "best.pt"), "--bootstrap", "0", "--workers", "0",
                 "--lung-share-limit", "0"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["calibration"]["how"].startswith("fitted out of source, on the 60 films of 1 held-out sources")
    assert "held-out sources" in m["covid_vs_rest"]["chosen_on"]
    record = json.loads((run / "best.calibration.json").read_text())
    assert record["temperature_how"] == m["calibration"]["how"]
    assert record["evaluation"]["covid_vs_rest"]["threshold"] == m["covid_vs_rest"]["threshold"]
