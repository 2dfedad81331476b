"""The one decision (covidxr.inference.decision): COVID yes or no at the shipped threshold, the other classes after
it, and cautions that belong to the film, not to the model."""

from __future__ import annotations

import pytest

from covidxr.inference.decision import (
    NEAR,
    OUTSIDE_LUNGS,
    UNUSUAL,
    OperatingPoint,
    decide,
    operating_point,
    probability,
)

CLASSES = ["covid", "normal", "pneumonia"]
POINT = OperatingPoint("covid", 0.38, "Youden's J on the held-out sources")


def test_the_operating_point_is_the_stored_threshold() -> None:
    summary = {"covid_vs_rest": {"positive": "covid", "threshold": 0.384, "chosen_on": "Youden's J on validation"}}
    assert operating_point(CLASSES, summary) == OperatingPoint("covid", 0.384, "Youden's J on validation")
    assert operating_point(CLASSES, None) == OperatingPoint("covid", None, "")
    assert operating_point(["a", "b"], summary) == OperatingPoint(None, None, "")
    assert "at least 38%" in operating_point(CLASSES, summary).rule()
    assert "most likely class" in operating_point(CLASSES, None).rule()


@pytest.mark.parametrize(("probs", "text"), [
    # the tab's example: normal leads, but the COVID probability reaches the threshold: the page says COVID
    ({"covid": 0.44, "normal": 0.46, "pneumonia": 0.10}, "COVID: yes"),
    ({"covid": 0.10, "normal": 0.2, "pneumonia": 0.7}, "COVID: no; most likely pneumonia"),
    ({"covid": 0.30, "normal": 0.6, "pneumonia": 0.1}, "COVID: no; most likely normal"),
])
def test_the_answer_is_covid_at_the_threshold_then_the_other_classes(probs: dict, text: str) -> None:
    decision = decide(probs, POINT)
    assert decision.text == text and decision.cautions == ()
    assert decision.probability == probs["covid"]
    assert decision.to_dict()["threshold"] == 0.38 and decision.to_dict()["text"] == text


def test_cautions_belong_to_the_film() -> None:
    near = decide({"covid": 0.36, "normal": 0.5, "pneumonia": 0.14}, POINT)
    assert near.cautions == (NEAR,) and near.text == f"COVID: no; most likely normal; caution: {NEAR}"
    every = decide({"covid": 0.41, "normal": 0.5, "pneumonia": 0.09}, POINT, borderline=True, lung_share=0.2)
    assert every.cautions == (NEAR, UNUSUAL, OUTSIDE_LUNGS) and every.text.startswith("COVID: yes; caution: ")
    clear = decide({"covid": 0.9, "normal": 0.05, "pneumonia": 0.05}, POINT, borderline=False, lung_share=0.8)
    assert clear.cautions == () and clear.text == "COVID: yes"


def test_without_a_threshold_the_most_likely_class_decides() -> None:
    point = OperatingPoint("covid")
    assert decide({"covid": 0.5, "normal": 0.3, "pneumonia": 0.2}, point).text == "COVID: yes"
    assert decide({"covid": 0.2, "normal": 0.3, "pneumonia": 0.5}, point).text == "COVID: no; most likely pneumonia"
    assert "yes when it is the most likely class" in decide({"covid": 0.2, "normal": 0.8}, point).figures
    assert decide({"covid": 0.34, "normal": 0.33, "pneumonia": 0.33}, point).cautions == ()  # no threshold to be near
    other = decide({"a": 0.2, "b": 0.8}, OperatingPoint(None))
    assert other.covid is None and other.text == "Most likely: b"


def test_figures_never_read_certain() -> None:
    decision = decide({"covid": 0.9996, "normal": 0.0002, "pneumonia": 0.0002}, POINT)
    assert decision.figures == "COVID probability > 99% (yes from 38%)"
    assert probability(0.004) == "< 1%" and probability(0.5) == "50%" and probability(float("nan")) == "–"
