"""The page's small pure rules: the headline that does not overstate, names instead of server paths, and the
words that lead with results on films from other hospitals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.eval_tables import chance_level, comparison_table
from app.evaluation import Evaluation, external_ece, trust_basis
from app.headline import ECE_LIMIT, LUNG_SHARE_LIMIT, OTHER_HOSPITALS, OUTSIDE_LUNGS, UNUSUAL, headline
from app.model_texts import crossval_how, single_class_sources
from app.redact import public_report, setting_rows, strip_paths
from app.settings import run_label


@pytest.mark.parametrize(("ece", "share", "borderline", "cautions"), [
    (None, None, False, ()),
    (ECE_LIMIT, LUNG_SHARE_LIMIT, False, ()),  # at the limits: not yet
    (0.21, None, False, (OTHER_HOSPITALS,)),
    (0.05, 0.18, False, (OUTSIDE_LUNGS,)),
    (0.21, 0.18, True, (OTHER_HOSPITALS, OUTSIDE_LUNGS, UNUSUAL)),
])
def test_headline_names_its_caveats_and_moves_the_percentage_below(ece, share, borderline, cautions) -> None:
    words = headline("pneumonia", 0.91, ece, share, borderline)
    assert words.cautions == cautions
    if cautions:
        assert words.title == "Leans towards **pneumonia**; " + "; ".join(cautions)
        assert "%" not in words.title and "91%" in words.below
    else:
        assert words.title == "Model output: **pneumonia** (91%)" and words.below == ""


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
    data = {"n_images": 61, "metrics": {"balanced_accuracy": 0.8, "per_class": {**per_class, "pneumonia": {
        "support": 20, "recall": 0.7}}}}
    if external:
        data["external"] = [{"name": "other", "n_images": 199, "metrics": {"per_class": per_class},
                             "calibration": {"ece": 0.2345}, "by_source": {
                                 "a": {"class_counts": {"covid": 40, "normal": 0}},
                                 "b": {"class_counts": {"covid": 0, "normal": 60}}}}]
    if crossval:
        data["crossval"] = {"mode": "probe", "arch": "resnet18", "folds": [
            {"name": "s1", "metrics": {"balanced_accuracy": 0.44}, "calibration": {"ece": 0.31}},
            {"name": "s2", "metrics": {"balanced_accuracy": 0.61}}]}
    return Evaluation(data)


def test_words_lead_with_films_from_other_hospitals() -> None:
    both = trust_basis(evaluation(True, True), "covid")
    assert both[0].startswith("On films from hospitals it never saw") and "off by 23%" in both[0]
    assert both[1].startswith("When each of 2 sources was in turn left out") and "44% to 61%" in both[1]
    assert both[-1].startswith("On 61 internal test images")
    only_internal = trust_basis(evaluation(False, False), "covid")
    assert len(only_internal) == 1 and only_internal[0].startswith("This model has **not** been tested")
    assert external_ece(evaluation(True, True)) == pytest.approx(0.31)  # the worst out-of-source calibration
    assert external_ece(evaluation(False, False)) is None and external_ece(None) is None


def test_model_tab_tables_carry_chance_and_caution() -> None:
    ev = evaluation(True, True)
    external = ev.external[0]
    assert chance_level(external) == 0.5 and chance_level(ev.data) == pytest.approx(1 / 3)
    table = comparison_table(external)
    assert table.loc[1].to_dict() == {"Classifier": "Chance: a guess without looking at the film",
                                      "Balanced accuracy": "50%", "Macro ROC-AUC": "0.50"}
    assert single_class_sources(external) == ["a", "b"]
    assert crossval_how(ev.data["crossval"]) == ("a quick version: only the network's last layer retrained each "
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


def test_covid_table_names_each_set_plainly_and_marks_unset_thresholds() -> None:
    from app.eval_tables import covid_table

    ci = {"estimate": 0.9, "lo": 0.8, "hi": 0.95}
    block = {"positive": "covid", "threshold": 0.4, "chosen_on": "Youden's J on validation", "sets": [
        {"name": "internal test", "n_positive": 10, "n_negative": 20, "threshold": 0.4, "auc": ci,
         "sensitivity": ci, "specificity": ci},
        {"name": "internal test: SIIM-FISABIO-RSNA COVID-19 (via vikasb512/Capstone-Project)", "n_positive": 5,
         "n_negative": 5, "threshold": 0.4, "auc": ci, "sensitivity": ci, "specificity": ci},
        {"name": "held out: NIH ChestX-ray8 (via muhammedtalo/COVID-19)", "n_positive": 0, "n_negative": 9,
         "threshold": None, "auc": {"estimate": None}, "sensitivity": {}, "specificity": {}},
        {"name": "external external", "n_positive": 99, "n_negative": 100, "threshold": 0.4, "auc": ci,
         "sensitivity": ci, "specificity": ci}]}
    table = covid_table(block)
    names = table["Films"].tolist()
    assert names[0].startswith("Internal test") and "only" in names[1] and "vikasb512" not in " ".join(names)
    assert "SIIM" in names[1]
    assert "left out of training" in names[2] and names[3] == "External: external"
    assert table["Sensitivity"].tolist()[2] == "not set here" and table["AUC (chance 0.50)"][0] == "0.90 (0.80–0.95)"
