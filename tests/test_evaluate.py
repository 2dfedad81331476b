"""End-to-end evaluation of a tiny real run: report, metrics.json, predictions, checkpoint, external data, CLI."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr.evaluation.__main__ import main
from covidxr.evaluation.analysis import SOURCE_CONFOUNDED
from covidxr.evaluation.outputs import PLOT_FILES
from covidxr.evaluation.report_external import NO_EXTERNAL
from covidxr.html_page import format_value
from covidxr.inference.predictor import Predictor
from covidxr.model.calibration import Origin
from covidxr.model.calibration_file import calibration_path
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidxr.model.trained import TrainedModel

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("best.pt", "split.csv", "history.csv", "config.json")
METRICS_KEYS = {"checkpoint", "checkpoint_sha256", "split", "n_images", "n_patients", "classes", "metrics",
                "metrics_uncalibrated", "ci", "calibration", "operating_points", "by_source", "by_view", "plots",
                "reproducibility", "warnings", "explain"}


def copy_run(run: Path, dest: Path) -> Path:
    """Copy the files of a run folder that evaluation reads (not last.pt), so the shared fixture stays untouched."""
    dest.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(run / name, dest / name)
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(err: str, prog: str = "covidxr.evaluate") -> str:
    """The single visible stderr line (progress-bar carriage returns removed); fails if there are several."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def evaluated(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tiny run evaluated on its test split with 100 bootstrap resamples."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("evaluate") / "run")
    before = sha256(run / "best.pt")
    assert main(["--checkpoint", str(run / "best.pt"), "--bootstrap", "100", "--workers", "0",
                 "--batch-size", "8"]) == 0
    eval_dir = run / "eval"
    return {"run": run, "eval": eval_dir, "sha_before": before,
            "metrics": json.loads((eval_dir / "metrics.json").read_text()),
            "predictions": pd.read_csv(eval_dir / "predictions.csv", keep_default_na=False)}


def test_metrics_json_has_the_layout_and_matches_predictions(evaluated: dict) -> None:
    m, pred = evaluated["metrics"], evaluated["predictions"]
    assert METRICS_KEYS <= set(m)
    assert m["split"] == "test" and set(pred["split"]) == {"test"}
    assert m["classes"] == ["covid", "normal", "pneumonia"]
    assert m["n_images"] == len(pred) == m["metrics"]["n"]
    assert m["n_patients"] == pred["patient_id"].nunique()
    assert m["metrics"]["accuracy"] == pytest.approx((pred["label"] == pred["predicted"]).mean())
    probs = pred[m["classes"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (np.array(m["classes"])[probs.argmax(axis=1)] == pred["predicted"]).all()
    raw = pred[[f"raw_{c}" for c in m["classes"]]].to_numpy()
    assert (raw.argmax(axis=1) == probs.argmax(axis=1)).all()  # temperature scaling never changes the prediction
    assert {"path", "relpath", "patient_id", "source", "view", "label"} <= set(pred.columns)
    assert m["ci"]["n_resamples"] == 100 and m["ci"]["seed"] == 0
    assert m["ci"]["metrics"]["accuracy"]["estimate"] == pytest.approx(m["metrics"]["accuracy"])
    cal = m["calibration"]
    assert cal["temperature"] > 0 and {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(cal)
    assert m["operating_points"]["positive"] == "covid" and len(m["operating_points"]["points"]) == 2
    assert set(m["by_source"]) == set(pred["source"]) and set(m["by_view"]) == set(pred["view"])
    assert set(m["plots"]) == set(PLOT_FILES)  # history.csv is there, so the training curves too
    for file in m["plots"].values():
        assert (evaluated["eval"] / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["explain"] is None


def test_reproducibility_record(evaluated: dict) -> None:
    rep = evaluated["metrics"]["reproducibility"]
    assert evaluated["metrics"]["checkpoint_sha256"] == rep["checkpoint_sha256"] == evaluated["sha_before"]
    assert rep["split_table_sha256"] == sha256(evaluated["run"] / "split.csv")
    assert len(rep["manifest_sha256"]) == 64 and rep["git_commit"]
    assert rep["bootstrap"]["n_resamples"] == 100 and rep["seeds"]["bootstrap"] == 0
    assert rep["command"][:3] == ["python", "-m", "covidxr.evaluate"] and "--bootstrap" in rep["command"]
    assert rep["config"]["arch"] == "resnet18" and "torch" in rep["library_versions"]
    assert rep["elapsed_seconds"] > 0


def test_report_is_self_contained_with_headline_metrics(evaluated: dict) -> None:
    m = evaluated["metrics"]
    html = (evaluated["eval"] / "report.html").read_text()
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro"):
        assert format_value(m["ci"]["metrics"][name]) in html, name
    for cls in m["classes"]:
        assert cls in html
    assert html.count("data:image/png;base64,") >= len(m["plots"])
    assert "<script" not in html and 'src="http' not in html
    for section in ("Model card", "Intended use", "not a diagnostic device", "Reproducibility", "Calibration"):
        assert section in html
    assert SOURCE_CONFOUNDED in html  # every covid image of the shared data comes from one source


def test_report_without_external_result_says_so_first(evaluated: dict) -> None:
    m = evaluated["metrics"]
    html = (evaluated["eval"] / "report.html").read_text()
    assert m["external"] == [] and m["crossval"] is None
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings[0] == "External validation" and headings.index("Internal test split: metrics") > 0
    assert html.index(NO_EXTERNAL.split(":")[0]) < html.index("<h2>Internal test split")
    assert "external validation" in html[:html.index("Contents")]  # the headline card: none


def test_evaluation_leaves_the_checkpoint_and_pins_its_calibration(evaluated: dict) -> None:
    path = evaluated["run"] / "best.pt"
    m = evaluated["metrics"]
    assert sha256(path) == evaluated["sha_before"] == m["checkpoint_sha256"]  # the report names the file on disk
    assert "temperature" not in load_checkpoint(path) and "evaluation" not in load_checkpoint(path)
    record = json.loads(calibration_path(path).read_text())
    assert record["checkpoint_sha256"] == m["checkpoint_sha256"] and record["temperature_how"].startswith("fitted")
    calibration = TrainedModel.load(path, device="cpu").calibration
    assert calibration.temperature == pytest.approx(m["calibration"]["temperature"])
    assert calibration.origin is Origin.VALIDATION and m["calibration"]["origin"] == "validation"
    assert record["temperature_origin"] == "validation"
    summary = dict(calibration.summary)
    assert summary["split"] == "test" and summary["n_images"] == m["n_images"]
    assert summary["report"] == "eval/report.html" and summary["metrics_json"] == "eval/metrics.json"
    assert summary["metrics"]["accuracy"] == pytest.approx(m["metrics"]["accuracy"])
    assert set(summary["metrics"]["per_class"]) == set(m["classes"])
    assert {"ci", "calibration", "operating_points"} <= set(summary)
    assert m["summary"] == summary
    assert Predictor.from_checkpoint(path, device="cpu").temperature == pytest.approx(record["temperature"])


def test_a_calibration_made_for_other_bytes_is_ignored(evaluated: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(evaluated["run"], run, ignore=shutil.ignore_patterns("eval*"))
    ckpt = load_checkpoint(run / "best.pt")
    save_checkpoint(run / "best.pt", {**ckpt, "epoch": -1})  # retrained in place: other bytes
    calibration = TrainedModel.load(run / "best.pt", device="cpu").calibration
    assert calibration.origin is Origin.NONE and calibration.temperature == 1.0 and not calibration.summary


def _external_tree(run: Path, shared: Path, dest: Path) -> tuple[Path, list[str]]:
    """COVID/ and NORMAL/ folders: one image of each class from the run's train split, one not in the run, plus a
    broken file; pneumonia is absent."""
    split = pd.read_csv(run / "split.csv", dtype=str, keep_default_na=False)
    meta = pd.read_csv(shared / "metadata.csv", dtype=str, keep_default_na=False)
    in_run = set(split["relpath"])
    seen = []
    for label in ("covid", "normal"):
        folder = dest / label.upper()
        folder.mkdir(parents=True)
        trained = split[(split["label"] == label) & (split["split"] == "train")]["relpath"].iloc[0]
        fresh = next(str(shared / p) for p in meta.loc[meta["label"] == label, "path"] if str(shared / p) not in in_run)
        for src in (trained, fresh):
            shutil.copy2(src, folder / Path(src).name)
        seen.append(f"{label.upper()}/{Path(trained).name}")
    (dest / "COVID" / "broken.png").write_bytes(b"this is not an image")
    return dest, seen


def test_external_folder_leaves_the_checkpoint_alone(evaluated: dict, shared_data: Path, tmp_path: Path) -> None:
    ext, seen = _external_tree(evaluated["run"], shared_data, tmp_path / "ext")
    ckpt_path = evaluated["run"] / "best.pt"
    before = sha256(ckpt_path)
    assert main(["--checkpoint", str(ckpt_path), "--data", str(ext), "--split", "all", "--bootstrap", "50",
                 "--workers", "0"]) == 0
    assert sha256(ckpt_path) == before
    out = evaluated["run"] / "eval-ext"
    m = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert m["data_is_external"] is True and m["split"] == "all" and m["n_images"] == 4 == len(pred)
    assert m["external"] == []  # no --external folder beside it
    assert list(m["unreadable"]) == ["COVID/broken.png"]
    assert set(pred["label"]) == {"covid", "normal"}  # folder names matched case-insensitively
    assert m["metrics"]["per_class"]["pneumonia"]["support"] == 0  # absent class: no crash, undefined values
    assert m["metrics"]["per_class"]["pneumonia"]["recall"] is None
    assert set(pred.loc[pred["seen_in_run"] == "train", "relpath"]) == set(seen)
    assert any("were in the run's own data" in w for w in m["warnings"])
    assert m["calibration"]["temperature"] == pytest.approx(evaluated["metrics"]["calibration"]["temperature"])
    assert "reused from the checkpoint" in m["calibration"]["how"]
    assert m["operating_points"]["chosen_on"].startswith("checkpoint")
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize("args, expected", [
    ([], "--checkpoint"),
    (["--checkpoint", "{run}/best.pt", "--bootstrap", "-1"], "--bootstrap"),
    (["--checkpoint", "{run}/best.pt", "--split", "train"], "--split"),
    (["--checkpoint", "{run}/missing.pt"], "checkpoint not found"),
    (["--checkpoint", "{run}/split.csv"], "not a"),
    (["--checkpoint", "{run}/best.pt", "--positive", "tuberculosis"], "--positive"),
    (["--checkpoint", "{run}/best.pt", "--data", "{run}/no-such-data"], "dataset not found"),
])
def test_bad_arguments_give_one_line_errors(evaluated: dict, capsys: pytest.CaptureFixture, args: list[str],
                                            expected: str) -> None:
    argv = [a.format(run=evaluated["run"]) for a in args]
    assert main(argv) == 2
    assert expected in one_line_error(capsys.readouterr().err)


def test_external_data_has_no_test_split(evaluated: dict, shared_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    ext, _ = _external_tree(evaluated["run"], shared_data, tmp_path / "ext")
    assert main(["--checkpoint", str(evaluated["run"] / "best.pt"), "--data", str(ext), "--split", "test"]) == 2
    assert "--split all" in one_line_error(capsys.readouterr().err)


@pytest.mark.slow  # a python subprocess per case
def test_cli_error_exit_status(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a checkpoint, just text\n")
    proc = subprocess.run([sys.executable, "-m", "covidxr.evaluate", "--checkpoint", str(bogus)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(bogus) in one_line_error(proc.stderr)


def test_metrics_json_is_its_record_read_back_unchanged(evaluated: dict) -> None:
    """The writer writes the record the reader returns: reading the file and writing the record again gives the same
    content, and every section the report and the app read is typed."""
    from covidxr.evaluation.records import CovidVsRest, Intervals, Metrics
    from covidxr.evaluation.results import load_evaluation, record_json

    record, predictions, folder = load_evaluation(evaluated["run"])
    assert folder == evaluated["eval"].resolve() and len(predictions) == record.n_images
    assert record_json(record) == evaluated["metrics"]
    assert isinstance(record.metrics, Metrics) and isinstance(record.ci, Intervals)
    assert isinstance(record.covid_vs_rest, CovidVsRest) and record.covid_vs_rest.sets[0].name == "internal test"
    assert record.metrics.per_class["covid"].support == evaluated["metrics"]["metrics"]["per_class"]["covid"]["support"]


def test_film_pass_logits_are_the_loaders_and_spare_their_pass(evaluated: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics take the evaluated films' logits from the film pass (each film decoded once): they equal the run's
    loaders' to the bit, and only the validation rows still go through a loader."""
    from covidxr.evaluation.film_pass import film_pass
    from covidxr.evaluation.inputs import EvalOptions, load_eval_data
    from covidxr.evaluation.logits import evaluated_table, predict_splits

    model = TrainedModel.load(evaluated["run"] / "best.pt", device="cpu")
    data = load_eval_data(model, EvalOptions(checkpoint=evaluated["run"] / "best.pt", batch_size=8, workers=0))
    table = evaluated_table(data)
    films = film_pass(Predictor(model), table["path"], every=True, progress=False)
    assert len(films.logits()) == len(table) > 0
    loaders = predict_splits(model, data)
    roles = []
    run_loader = TrainedModel.run_loader
    monkeypatch.setattr(TrainedModel, "run_loader",
                        lambda self, loader, desc="", **kw: roles.append(desc) or run_loader(self, loader, desc, **kw))
    passed = predict_splits(model, data, known=films.logits())
    assert roles == ["predict val"]  # the test loader was not run
    assert np.array_equal(passed.logits, loaders.logits) and np.array_equal(passed.val_logits, loaders.val_logits)
    assert passed.table.equals(loaders.table)
    missing = dict(list(films.logits().items())[1:])  # one film without logits: its loader runs after all
    roles.clear()
    assert np.array_equal(predict_splits(model, data, known=missing).logits, loaders.logits)
    assert sorted(roles) == ["predict test", "predict val"]
