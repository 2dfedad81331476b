"""The page's small pure rules: the headline's words and what its cautions mean, names instead of server paths, the
one line of natural frequencies under every answer, and tables judged against chance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.eval_tables import chance_level, comparison_table
from app.evaluation import Evaluation, reliability_line
from app.headline import caution_notes, figures_line
from app.model_texts import crossval_how, judge, single_class_sources
from app.redact import public_report, setting_rows, strip_paths
from app.settings import run_label
from covidxr.evaluation.results import CovidSet, read_record
from covidxr.inference.decision import NEAR, UNUSUAL, OperatingPoint, decide

POINT = OperatingPoint("covid", 0.38, "Youden's J on the held-out sources")


def test_headline_figures_and_what_each_caution_means() -> None:
    probs = {"covid": 0.36, "normal": 0.5, "pneumonia": 0.14}
    decision = decide(probs, POINT, borderline=True)
    assert figures_line(decision, probs) == ("COVID probability 36% (yes from 38%). Other classes: normal 50%, "
                                             "pneumonia 14%.")
    notes = caution_notes(decision)
    assert decision.cautions == (NEAR, UNUSUAL) and len(notes) == 2
    assert notes[0].startswith("**Close to the threshold:**") and "Unusual film: read with care" in notes[1]
    assert caution_notes(decide({"covid": 0.05, "normal": 0.9, "pneumonia": 0.05}, POINT)) == []


def test_strip_paths_keeps_names_urls_and_base64() -> None:
    text = ("checkpoint /srv/runs/r50/best.pt, data ../shared/data/all.csv and ~/x/lung-seg.pt; see "
            "https://example.org/a/b; <img src=\"data:image/png;base64,iVB+/abc/de==\"></p>")
    out = strip_paths(text)
    assert out == ("checkpoint best.pt, data all.csv and lung-seg.pt; see https://example.org/a/b; "
                   "<img src=\"data:image/png;base64,iVB+/abc/de==\"></p>")
    report = public_report(f"<td>{Path.cwd()}/runs/x/best.pt</td>".encode())
    assert report == b"<td>best.pt</td>"


def test_setting_rows_read_as_words_without_paths() -> None:
    rows = setting_rows({"data": "/work/shared/data/all.csv", "img_size": 160, "out": "/tmp/page-run",
                         "lung_model": "~/.cache/covidxr/lungs/lung-seg.pt", "arch": "resnet50"})
    assert rows == {"Data": "all.csv", "Img size": 160, "Out": "page-run", "Lung model": "lung-seg.pt",
                    "Arch": "resnet50"}
    assert not any(re.search(r"(^|\s)/\w", str(v)) for v in rows.values())


def test_run_label_is_the_run_name() -> None:
    assert run_label(Path("/srv/runs/efficientnet_lite0-quickstart/best.pt")) == "efficientnet_lite0-quickstart"
    assert run_label(Path("/srv/runs/r50/last.pt")) == "r50 (last)"


def evaluation(external: bool, crossval: bool) -> Evaluation:
    per_class = {"covid": {"support": 40, "recall": 0.5}, "normal": {"support": 60, "recall": 0.9}}
    ci = {"estimate": 0.8, "lo": 0.7, "hi": 0.9}
    internal = {"name": "internal test", "n_positive": 20, "n_negative": 41, "threshold": 0.38, "auc": ci,
                "sensitivity": {"estimate": 0.84}, "specificity": {"estimate": 0.82}}
    data = {"n_images": 61, "metrics": {"balanced_accuracy": 0.8, "per_class": {**per_class, "pneumonia": {
        "support": 20, "recall": 0.7}}}, "covid_vs_rest": {"threshold": 0.38, "sets": [internal]}}
    if external:
        data["external"] = [{"name": "other", "n_images": 199, "metrics": {"per_class": per_class},
                             "calibration": {"ece": 0.2345}, "by_source": {
                                 "a": {"class_counts": {"covid": 40, "normal": 0}},
                                 "b": {"class_counts": {"covid": 0, "normal": 60}}}}]
        data["covid_vs_rest"]["sets"].append({
            "name": "external other", "n_positive": 99, "n_negative": 100, "threshold": 0.38, "auc": ci,
            "sensitivity": {"estimate": 0.77}, "specificity": {"estimate": 0.80}})
    if crossval:
        data["crossval"] = {"mode": "probe", "arch": "resnet18", "folds": [
            {"name": "s1", "metrics": {"balanced_accuracy": 0.44}, "calibration": {"ece": 0.31}},
            {"name": "s2", "metrics": {"balanced_accuracy": 0.61}}]}
    return Evaluation(read_record(data))


def test_one_line_of_natural_frequencies_at_the_shipped_threshold() -> None:
    line = reliability_line(evaluation(True, True), POINT)
    assert line == ("On 199 films from hospitals it never saw, it found 76 of 99 COVID films and wrongly called 20 of "
                    "100 other films COVID; 76 of its 96 COVID calls were right. All 99 COVID films there come from "
                    "one collection, so part of this may be recognising the collection rather than the disease.")
    internal = reliability_line(evaluation(False, False), POINT)
    assert internal.startswith("It has **not** been tested at this threshold on films from hospitals it never saw")
    assert "on 61 internal test films" in internal and "17 of 20 COVID films" in internal
    # figures of another operating point are never quoted for this one
    other = reliability_line(evaluation(True, False), OperatingPoint("covid", 0.5))
    assert "76 of 99" not in other and "no COVID figures were saved" in other
    assert reliability_line(None, POINT).startswith("This model has not been evaluated")
    assert reliability_line(evaluation(True, True), OperatingPoint("covid")).startswith("No COVID threshold was stored")


@pytest.mark.parametrize(("value", "lo", "hi", "words"), [
    (0.33, 0.25, 0.41, "below chance"), (0.52, 0.4, 0.6, "at chance"), (0.7, 0.6, 0.8, "better than chance"),
    (0.9, 0.85, 0.95, "good"), (0.45, None, None, "below chance"), (None, None, None, "not measured")])
def test_results_are_judged_against_chance(value, lo, hi, words) -> None:
    assert judge(value, 0.5, lo, hi, good=0.85) == words


def test_model_tab_tables_carry_chance_and_caution() -> None:
    ev = evaluation(True, True)
    external = ev.external[0]
    assert chance_level(external) == 0.5 and chance_level(ev.record) == pytest.approx(1 / 3)
    table = comparison_table(external)
    assert table.loc[1].to_dict() == {"Classifier": "Chance: a guess without looking at the film",
                                      "Balanced accuracy": "50%", "Macro ROC-AUC": "0.50"}
    assert single_class_sources(external) == ["a", "b"]
    assert crossval_how(ev.record.crossval) == ("a quick version: only the network's last layer retrained each "
                                                 "time, resnet18")


def test_gate_table_reads_each_kind_in_words() -> None:
    from app.eval_tables import gate_table

    report = {"evaluated": {"n": 10, "refused": 1, "borderline": 2, "checks": {"ood": 1}},
              "variants": {"rotated 90": {"n": 10, "refused": 10, "borderline": 0, "checks": {"rotated": 10}}},
              "made": {"documents": {"n": 4, "refused": 4, "checks": {"document": 4}}},
              "folders": {"/srv/data/notcxr": {"ct (not fitted on)": {"n": 13, "refused": 12, "checks": {
                  "ct": 11, "photo": 1}}}}}
    rows = gate_table(report).to_dict("records")
    assert rows[0] == {"Images": "Test films", "n": 10, "Passed": "70% (7)", "Unusual (shown, marked)": "20% (2)",
                       "Refused": "10% (1)", "Reasons given": "too unlike the training films 1"}
    assert rows[1]["Images"] == "Test films turned 90°" and rows[1]["Refused"] == "100%"
    assert rows[2]["Images"] == "Made documents"
    assert rows[3] == {"Images": "CT slices (patients the gate never saw)", "n": 13, "Passed": "8% (1)",
                       "Unusual (shown, marked)": "0%", "Refused": "92% (12)",
                       "Reasons given": "CT slice 11, photograph 1"}


def test_covid_table_names_each_set_plainly_and_leaves_unset_thresholds_empty() -> None:
    from app.eval_tables import covid_table

    ci = {"estimate": 0.9, "lo": 0.8, "hi": 0.95}
    sets = [
        {"name": "internal test", "n_positive": 10, "n_negative": 20, "threshold": 0.4, "auc": ci,
         "sensitivity": ci, "specificity": ci},
        {"name": "internal test: SIIM-FISABIO-RSNA COVID-19 (via vikasb512/Capstone-Project)", "n_positive": 5,
         "n_negative": 5, "threshold": 0.4, "auc": ci, "sensitivity": ci, "specificity": ci},
        {"name": "held out: NIH ChestX-ray8 (via muhammedtalo/COVID-19)", "n_positive": 0, "n_negative": 9,
         "threshold": None, "auc": {"estimate": None}, "sensitivity": {}, "specificity": {}},
        {"name": "external external", "n_positive": 99, "n_negative": 100, "threshold": 0.4, "auc": ci,
         "sensitivity": ci, "specificity": ci}]
    sets = [read_record({"metrics": {}, "covid_vs_rest": {"sets": [s]}}).covid_vs_rest.sets[0] for s in sets]
    assert all(isinstance(s, CovidSet) for s in sets)
    table = covid_table(sets, {"external": "COVID-CXNet + chest X-ray teaching films"})
    names = table["Films"].tolist()
    assert names[0].startswith("Internal test") and "only" in names[1] and "vikasb512" not in " ".join(names)
    assert "SIIM" in names[1]
    assert "left out of training" in names[2]
    assert names[3] == "Never seen in training: COVID-CXNet + chest X-ray teaching films"
    assert table["Sensitivity"].tolist()[2] == "–" and table["AUC (chance 0.50)"][0] == "0.90 (0.80–0.95)"


def test_left_out_sources_below_chance_are_said_to_be() -> None:
    from app.model_view import crossval_sentence

    rows = [{"name": "lecuong1502/BTL_Machine_Learning", "metrics": {"balanced_accuracy": 0.33, "per_class": {
        "normal": {"support": 50}, "pneumonia": {"support": 50}}},
        "ci": {"metrics": {"balanced_accuracy": {"estimate": 0.33, "lo": 0.25, "hi": 0.41}}}}]
    assert crossval_sentence(rows) == ("Balanced accuracy on each left-out source: Kermany paediatric (Guangzhou) 33% "
                                       "(chance 50%): **below chance**.")
