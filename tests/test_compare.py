"""Comparing evaluations: one table with intervals, paired bootstrap on the same images, refusal of mismatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from covidxr.evaluation.__main__ import main as evaluate_main
from covidxr.evaluation.compare import holm, main

RUN_FILES = ("best.pt", "split.csv", "history.csv", "config.json")


def one_line_error(err: str) -> str:
    """The single visible stderr line; fails if there are several or a traceback."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("covidxr.compare: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def two_evaluations(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same checkpoint (a copy of the tiny run) evaluated twice: into RUN/eval and into RUN/eval-again."""
    run = tmp_path_factory.mktemp("compare") / "run"
    run.mkdir()
    for name in RUN_FILES:
        shutil.copy2(tiny_run / name, run / name)
    common = ["--checkpoint", str(run / "best.pt"), "--bootstrap", "50", "--workers", "0"]
    assert evaluate_main(common) == 0
    assert evaluate_main([*common, "--out", str(run / "eval-again")]) == 0
    return run, run / "eval-again"


def test_identical_models_are_not_significantly_different(two_evaluations: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run, again = two_evaluations
    out = tmp_path / "cmp"
    assert main([str(run), str(again), "--out", str(out), "--bootstrap", "200"]) == 0
    assert "not significant" in capsys.readouterr().out
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["run"]) == ["run", "run/eval-again"]
    for metric in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro"):
        assert {metric, f"{metric}_lo", f"{metric}_hi"} <= set(table.columns)
        assert table[metric].nunique() == 1  # same predictions, same resamples: same numbers
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert table["accuracy"].iloc[0] == pytest.approx(evaluated["metrics"]["accuracy"])
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 1
    assert pairs["diff"].iloc[0] == 0 and not pairs["significant"].iloc[0] and not pairs["significant_holm"].iloc[0]
    html = (out / "comparison.html").read_text()
    assert "run/eval-again" in html and "macro ROC-AUC" in html
    payload = json.loads((out / "comparison.json").read_text())
    assert payload["n_resamples"] == 200 and payload["n_images"] == evaluated["n_images"]


def test_evaluations_on_different_images_are_refused(two_evaluations: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, again = two_evaluations
    fewer = tmp_path / "fewer"
    shutil.copytree(again, fewer)
    predictions = pd.read_csv(fewer / "predictions.csv")
    predictions.iloc[1:].to_csv(fewer / "predictions.csv", index=False)
    assert main([str(run), str(fewer), "--out", str(tmp_path / "cmp")]) == 2
    assert "same images" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


def test_checklist_differences_name_what_changed(two_evaluations: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    run, again = two_evaluations
    changed = tmp_path / "changed"
    shutil.copytree(again, changed)
    metrics = json.loads((changed / "metrics.json").read_text())
    metrics["model_card"]["model"]["best_epoch"] = 7
    for point in (metrics["operating_points"] or {}).get("points") or []:
        point["threshold"] = 0.123
    (changed / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "cmp"
    assert main([str(run), str(changed), "--out", str(out), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    differences = json.loads((out / "comparison.json").read_text())["checklist_differences"]
    facts = {d["fact"]: d for d in differences}
    assert "selection" in facts and "data" not in facts
    assert ["epoch 7" in str(v) for v in list(facts["selection"].values())[2:]] == [False, True]
    assert ("thresholds" in facts) == bool(metrics["operating_points"])
    assert "selection" in printed and "| selection |" in (out / "checklist-differences.md").read_text()
    predictions = pd.read_csv(changed / "predictions.csv")
    predictions.iloc[1:].to_csv(changed / "predictions.csv", index=False)
    assert main([str(run), str(changed), "--out", str(tmp_path / "refused")]) == 2
    assert "checklists differ in: selection" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("args", [
    ["only-one"], ["{run}", "{tmp}/nothing-here"], ["{run}", "{run}", "--bootstrap", "0"],
])
def test_bad_arguments(two_evaluations: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                       args: list[str]) -> None:
    run, _ = two_evaluations
    assert main([a.format(run=run, tmp=tmp_path) for a in args]) == 2
    one_line_error(capsys.readouterr().err)


def test_holm_adjustment() -> None:
    adjusted = holm([0.01, 0.04, None, 0.03])  # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 0.04)
    assert adjusted[2] is None
    assert adjusted[0] == pytest.approx(0.03) and adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06)


def test_an_unreadable_metrics_json_is_refused_in_one_line(two_evaluations: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """compare reads metrics.json through the one reader: a key it does not know is named, in one line."""
    run, again = two_evaluations
    garbled = tmp_path / "garbled"
    shutil.copytree(again, garbled)
    metrics = json.loads((garbled / "metrics.json").read_text())
    metrics["calibration"]["temprature"] = 1.0
    (garbled / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(run), str(garbled), "--out", str(tmp_path / "cmp")]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "unknown key 'calibration.temprature'" in error and "metrics.json" in error
