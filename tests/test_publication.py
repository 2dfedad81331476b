"""What a paper needs from an evaluation: the reporting checklists bound to the run's facts, the failure gallery, the
subgroups, the decision curve, a report that fits 1280 px and prints to PDF, and the checklist differences of two
runs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import write_subset_manifest
from PIL import Image
from test_evaluate import copy_run, one_line_error

from covidxr.evaluation.__main__ import main
from covidxr.evaluation.checklist import checklist_rows, status_counts
from covidxr.evaluation.checklist_diff import fact_differences
from covidxr.evaluation.checklist_items import CLAIM, TRIPOD_AI
from covidxr.evaluation.decision_curve import decision_curve, net_benefit
from covidxr.evaluation.gallery import THUMB_SIDE, confident_errors, error_groups
from covidxr.evaluation.pdf import write_pdf
from covidxr.evaluation.subgroups import MIN_IMAGES, age_band, subgroups

CLASSES = ["covid", "normal", "pneumonia"]


# ------------------------------------------------------------------------------------------------ pure functions


def test_net_benefit_matches_a_hand_computation() -> None:
    y = np.array([1, 1, 0, 0, 0])
    score = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    nb = net_benefit(y, score, [0.3, 0.5])
    # pt 0.3: treated 0.9, 0.4, 0.6 -> TP 2, FP 1 of 5: 2/5 - 1/5 * 0.3/0.7; pt 0.5: TP 1, FP 1: 1/5 - 1/5 * 1
    assert nb["model"] == pytest.approx([2 / 5 - 1 / 5 * 3 / 7, 0.0])
    assert nb["treat_all"] == pytest.approx([2 / 5 - 3 / 5 * 3 / 7, 2 / 5 - 3 / 5])
    assert nb["treat_none"] == [0.0, 0.0]
    # another prevalence re-weights sensitivity (2/2) and false-positive rate (1/3) at pt 0.3
    assert net_benefit(y, score, [0.3], prevalence=0.1)["model"] == pytest.approx([0.1 - 1 / 3 * 0.9 * 3 / 7])
    with pytest.raises(ValueError, match="positive and negative"):
        net_benefit(np.ones(3), score[:3], [0.5])


def test_decision_curve_states_its_prevalence() -> None:
    labels = ["covid", "covid", "normal", "pneumonia", "normal"]
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    own = decision_curve("ext", labels, probs, CLASSES, "covid")
    assert own["prevalence"] == pytest.approx(0.4) and own["prevalence_from"] == "the set's own"
    set_by_user = decision_curve("ext", labels, probs, CLASSES, "covid", prevalence=0.1)
    assert set_by_user["prevalence"] == 0.1 and set_by_user["curve"]["model"] != own["curve"]["model"]
    assert "note" in decision_curve("ext", ["normal"] * 2, probs[:2], CLASSES, "covid")


def test_gallery_picks_the_most_confident_errors() -> None:
    probs = np.array([[0.2, 0.7, 0.1],    # covid said normal, 0.7
                      [0.1, 0.1, 0.8],    # covid said pneumonia, 0.8
                      [0.9, 0.05, 0.05],  # covid right
                      [0.3, 0.6, 0.1],    # covid said normal, 0.6
                      [0.1, 0.8, 0.1],    # normal right
                      [0.95, 0.05, 0.0]])  # normal said covid, 0.95
    y = np.array([0, 0, 0, 0, 1, 1])
    assert confident_errors(probs, y, per_class=2) == {0: [1, 0], 1: [5], 2: []}
    frame = pd.DataFrame({"label": [CLASSES[k] for k in y], "predicted": [CLASSES[k] for k in probs.argmax(1)],
                          "source": ["a", "a", "a", "b", "b", "b"]})
    groups = error_groups(frame)
    assert {(r["true class"], r["model said"], r["errors"]) for r in groups["by_answer"]} == {
        ("covid", "normal", 2), ("covid", "pneumonia", 1), ("normal", "covid", 1)}
    assert [(r["source"], r["errors"], r["images"]) for r in groups["by_source"]] == [("a", 2, 3), ("b", 2, 3)]


def test_subgroups_flag_groups_too_small_to_say_anything() -> None:
    rng = np.random.default_rng(0)
    n = 40
    labels = ["covid"] * 15 + ["normal"] * 10 + ["covid"] * 10 + ["normal"] * 5
    sex = ["female"] * 25 + ["male"] * 10 + [""] * 5  # males are all covid; five rows without sex
    probs = rng.dirichlet(np.ones(3), size=n)
    frame = pd.DataFrame({"label": labels, "sex": sex, "age": ["35"] * 20 + ["70"] * 20,
                          "patient_id": [str(i) for i in range(n)], **{c: probs[:, k] for k, c in enumerate(CLASSES)}})
    groups = subgroups(frame, CLASSES, "covid", n_boot=30)
    female, male = groups["sex"]["female"], groups["sex"]["male"]
    assert female["n"] == 25 and not female["small"] and female["auc_vs_rest"]["lo"] is not None
    assert male["small"] and f"n < {MIN_IMAGES}" in male["flag"] and "no covid" in male["flag"]
    assert male["auc_vs_rest"] is None and groups["sex"]["(unknown)"]["n"] == 5
    assert list(groups["age_band"]) == ["18-39", "60-79"]
    assert age_band(pd.Series(["17", "80", "", "x"])).tolist() == ["<18", "80+", "", ""]


def test_pdf_says_so_when_chromium_is_missing(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text("<html><body>x</body></html>")
    message = write_pdf(page, tmp_path / "report.pdf", browser=str(tmp_path / "no-such-chromium"))
    assert message.startswith("no PDF:") and "\n" not in message and not (tmp_path / "report.pdf").exists()


# ----------------------------------------------------------------------------- one evaluation with an external set


@pytest.fixture(scope="module")
def published(tiny_run: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny run evaluated with an external folder (12 films per class of external/, with age and sex)."""
    tmp = tmp_path_factory.mktemp("publish")
    run = copy_run(tiny_run, tmp / "run")
    hospital = write_subset_manifest(shared_data.parent / "external", tmp / "hospital" / "manifest.csv", 12).parent
    out = tmp / "eval"
    assert main(["--checkpoint", str(run / "best.pt"), "--external", str(hospital), "--bootstrap", "30",
                 "--workers", "0", "--batch-size", "8", "--gallery", "2", "--lung-share-limit", "0",
                 "--out", str(out)]) == 0
    return {"run": run, "out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_checklists_have_every_item_beside_the_report(published: dict) -> None:
    out, rows = published["out"], published["metrics"]["checklist"]
    assert len(CLAIM) == 44 and len(TRIPOD_AI) == 27 and len(rows) == 71
    markdown = (out / "checklist.md").read_text()
    assert len(re.findall(r"^\| \d+ \|", markdown, flags=re.M)) == 71
    assert "Reporting checklist" in (out / "checklist.html").read_text()
    for row in rows:
        assert (row["status"] == "author") == row["value"].startswith("author to complete: ")
    counts = status_counts(rows)
    assert counts["filled"] + counts["partly"] > counts["author"]


def _value(rows: list[dict], checklist: str, number: str) -> dict:
    return next(r for r in rows if r["checklist"] == checklist and r["number"] == number)


def test_checklist_values_follow_the_run_facts(published: dict) -> None:
    metrics = published["metrics"]
    rows = checklist_rows(metrics)
    assert "1 of 1 epochs" in _value(rows, "CLAIM 2024", "26")["value"]
    assert _value(rows, "CLAIM 2024", "33")["status"] == "filled" and "hospital" in _value(rows, "CLAIM 2024",
                                                                                              "33")["value"]
    changed = copy.deepcopy(metrics)
    changed["reproducibility"]["config"]["epochs"] = 7
    changed["model_card"]["model"]["epochs_trained"] = 5
    changed["model_card"]["data"]["split_counts"]["test"]["covid"] += 100
    changed["external"] = []
    changed["calibration"]["temperature"] = 2.5
    changed["ci"] = None
    after = checklist_rows(changed)
    assert "5 of 7 epochs" in _value(after, "CLAIM 2024", "26")["value"]
    before_test = metrics["model_card"]["data"]["split_counts"]["test"]
    assert f"test: {sum(before_test.values()) + 100} " in _value(after, "CLAIM 2024", "21")["value"]
    assert _value(after, "CLAIM 2024", "33")["status"] == "author"
    assert "T = 2.500" in _value(after, "TRIPOD+AI 2024", "24")["value"]
    assert _value(after, "CLAIM 2024", "30")["status"] == "author"
    facts = {d["fact"] for d in fact_differences([("a", metrics), ("b", changed)])}
    assert {"training", "split_counts", "external", "calibration", "uncertainty"} <= facts
    assert "data" not in facts


def test_gallery_subgroups_and_decision_curve_in_the_report(published: dict) -> None:
    out, extras = published["out"], published["metrics"]["publication"]
    page = (out / "report.html").read_text()
    for anchor in ("failure-gallery", "subgroups", "clinical-utility", "checklist"):
        assert f'id="{anchor}"' in page
    assert "data:image/jpeg;base64," in page and 'src="gallery/' not in page
    evaluated = set(pd.read_csv(out / "predictions.csv")["relpath"]) | set(
        pd.read_csv(out / "predictions-external-hospital.csv")["relpath"])
    items = [item for g in extras["gallery"] for item in g["items"]]
    assert items and {item["relpath"] for item in items} <= evaluated
    for item in items:
        assert item["label"] != item["predicted"]
        with Image.open(out / item["thumbnail"]) as picture:
            assert picture.format == "JPEG" and max(picture.size) <= THUMB_SIDE
    assert {"sex", "age_band"} <= set(extras["subgroups"]["hospital"])
    assert sum(g["n"] for g in extras["subgroups"]["hospital"]["sex"].values()) == 24
    curve = extras["decision_curves"][0]
    assert curve["name"] == "hospital" and curve["prevalence"] == pytest.approx(0.5)
    assert (out / "decision_curve.png").is_file()


def test_bad_prevalence_is_a_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--checkpoint", "x.pt", "--prevalence", "1.5"]) == 2
    assert "prevalence" in one_line_error(capsys.readouterr().err)


@pytest.mark.browser
def test_report_fits_1280_px_and_prints_to_pdf(published: dict) -> None:
    from playwright.sync_api import sync_playwright

    require_chromium()
    out = published["out"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((out / "report.html").as_uri())
            assert page.evaluate("document.scrollingElement.scrollWidth") <= 1280
        finally:
            browser.close()
    assert write_pdf(out / "report.html", out / "report.pdf", CHROMIUM) == f"pdf: {out / 'report.pdf'}"
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
