"""metrics.json as typed records: written and read back unchanged, older shapes upgraded in one place, anything else
refused in one line; the app reads saved evaluations through the same reader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from covidxr.errors import CovidxrError
from covidxr.evaluation.records import (
    CalibrationResult,
    ClassMetrics,
    CovidSet,
    CovidVsRest,
    EvaluationRecord,
    ExternalSet,
    Interval,
    Intervals,
    LungShare,
    Metrics,
    MetricsShapeError,
    evaluation_record,
    read_record,
    record_json,
)
from covidxr.evaluation.results import load_evaluation, per_class_rows


def _record() -> EvaluationRecord:
    per_class = {"covid": ClassMetrics(precision=0.8, recall=0.7, specificity=0.9, support=10, n_predicted=9),
                 "normal": ClassMetrics(precision=0.7, recall=0.9, specificity=0.7, support=12, n_predicted=13)}
    metrics = Metrics(n=22, classes=["covid", "normal"], accuracy=0.8, balanced_accuracy=0.8, roc_auc_macro=0.9,
                      confusion_matrix=[[7, 3], [1, 11]], per_class=per_class)
    ci = Intervals(metrics={"balanced_accuracy": Interval(0.8, 0.7, 0.9, 100, 0)},
                   per_class={"covid": {"sensitivity": Interval(0.7, 0.5, 0.9, 100, 0)}}, n_resamples=100, seed=0)
    covid = CovidVsRest(positive="covid", threshold=0.4, chosen_on="validation",
                        sets=[CovidSet("internal test", 10, 12, 0.4, Interval(0.9), Interval(0.7), Interval(0.9))])
    external = ExternalSet(name="other", n_images=30, metrics=metrics, warnings=["one source"],
                           calibration=CalibrationResult(temperature=1.2, how="fitted", ece_after=0.1))
    return EvaluationRecord(checkpoint="best.pt", checkpoint_sha256="a" * 64, split="test", data_is_external=False,
                            n_images=22, classes=["covid", "normal"], metrics=metrics, ci=ci,
                            calibration=CalibrationResult(temperature=1.2, how="fitted", why_not_out_of_source="none"),
                            covid_vs_rest=covid, external=[external], crossval=None,
                            lung_share=LungShare(mean=None, median=None, n=0, method="gradcam", note="skipped"),
                            gate={"evaluated": {"n": 22}})


def test_a_record_written_and_read_back_is_the_same_record() -> None:
    record = _record()
    content = json.loads(json.dumps(record_json(record), allow_nan=False))
    assert read_record(content) == record == evaluation_record(content)
    assert content["crossval"] is None  # a section every file has is written, even when empty
    assert "pdf" not in content and "site" not in content  # ... one written only sometimes is left out when None
    assert "note" in content["lung_share"] and "lung_model" not in content["lung_share"]
    assert "why_not_out_of_source" not in content["external"][0]["calibration"]


def test_older_shapes_are_upgraded_in_one_place() -> None:
    metrics = {"per_class": {"covid": {"support": 3, "recall": 0.5}}}
    # an evaluation of external data from before data_is_external: "external": true
    old = read_record({"metrics": metrics, "external": True, "n_images": 3})
    assert old.data_is_external is True and old.external == []
    # one external set as an object, its calibration with "ece" only
    single = read_record({"metrics": metrics, "external": {"name": "x", "metrics": metrics,
                                                           "calibration": {"ece": 0.25}}})
    assert [e.name for e in single.external] == ["x"] and single.external[0].calibration.ece_after == 0.25
    # the summary stored with a checkpoint reads as the evaluation it summarises (its compact sets left out)
    summary = read_record({"split": "test", "dataset": "all.csv", "metrics": {"balanced_accuracy": 0.7},
                           "external": [{"name": "x", "n_images": 3, "balanced_accuracy": {"estimate": 0.5}}],
                           "report": "eval/report.html", "metrics_json": "eval/metrics.json", "created": "now"})
    assert summary.data == "all.csv" and summary.metrics.balanced_accuracy == 0.7 and summary.external == []
    # a section an old file lacks is None, not an error
    assert old.covid_vs_rest is None and old.lung_share is None and per_class_rows(old)[0]["sensitivity"] == 0.5


@pytest.mark.parametrize(("content", "words"), [
    ({"metrics": {"accuracy": 0.5}, "calibration": {"temprature": 1.0}}, "unknown key 'calibration.temprature'"),
    ({"metrics": {"accuracy": "high"}}, "metrics.accuracy: expected float, found str 'high'"),
    ({"metrics": {"per_class": {"covid": {"support": 1.5}}}}, "metrics.per_class.covid.support: expected int"),
    ({"metrics": {}, "external": [{"name": 3}]}, "external[0].name: expected str"),
    ({"accuracy": 0.5}, "not an evaluation of covidxr.evaluate (no 'metrics' object)"),
    ([1, 2], "not an evaluation"),
])
def test_an_unknown_or_garbled_shape_is_refused_in_one_line(content: object, words: str) -> None:
    with pytest.raises(MetricsShapeError) as caught:
        read_record(content, "run/eval/metrics.json")
    message = str(caught.value)
    assert words in message and message.startswith("run/eval/metrics.json: ") and "\n" not in message


def test_the_writer_cannot_add_a_key_without_a_field() -> None:
    content = record_json(_record()) | {"new_section": {}}
    with pytest.raises(MetricsShapeError, match="unknown key 'new_section'"):
        evaluation_record(content)


def _evaluated_run(tmp_path: Path, content: object) -> Path:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(content))
    (run / "eval" / "predictions.csv").write_text("relpath,label,predicted\na.png,covid,covid\n")
    return run


def test_results_and_the_app_read_the_file_through_the_reader(tmp_path: Path) -> None:
    from app.evaluation import load_evaluation as app_evaluation

    run = _evaluated_run(tmp_path, record_json(_record()))
    record, _, _ = load_evaluation(run)
    assert record == _record()
    predictor = SimpleNamespace(checkpoint_path=run / "best.pt", metrics=None, checkpoint_sha256="a" * 64)
    shown = app_evaluation(predictor)
    assert shown is not None and shown.record == record and shown.notes == []
    assert [s.name for s in shown.external] == ["other"]


def test_a_garbled_file_is_refused_by_results_and_noted_by_the_app(tmp_path: Path) -> None:
    from app.evaluation import load_evaluation as app_evaluation

    run = _evaluated_run(tmp_path, {"metrics": {"accuracy": 0.5}, "gates": {}})
    with pytest.raises(CovidxrError, match="unknown key 'gates'"):
        load_evaluation(run)
    summary = {"checkpoint_sha256": "a" * 64, "split": "test", "metrics": {"balanced_accuracy": 0.6},
               "metrics_json": "eval/metrics.json"}
    predictor = SimpleNamespace(checkpoint_path=run / "best.pt", metrics=summary, checkpoint_sha256="a" * 64)
    shown = app_evaluation(predictor)
    assert shown is not None and shown.record.metrics.balanced_accuracy == 0.6  # the checkpoint's own summary
    assert len(shown.notes) == 1 and "unknown key 'gates'" in shown.notes[0] and str(tmp_path) not in shown.notes[0]
    predictor.metrics = None
    assert app_evaluation(predictor) is None
