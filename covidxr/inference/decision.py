"""The one decision the page, the downloads and the DICOM report state about a film, made once, here.

The question a clinician brings is "COVID or not". The model answers it at its shipped operating point: the COVID
threshold that ``python -m covidxr.evaluate`` fixed before testing (Youden's J on the held-out sources or the
validation split) and stored with the checkpoint's calibration (``ckpt["evaluation"]["covid_vs_rest"]``, read by
:func:`operating_point`). A film is "COVID: yes" when its COVID probability reaches that threshold; otherwise
"COVID: no" and the most likely of the other classes is named. Without a stored threshold the rule is the most
likely class, and the decision says so.

Cautions belong to the film, not to the model (model-level reliability is one line of natural frequencies under the
headline, see ``app.evaluation.reliability_line``): a COVID probability close to the threshold, a film in the input
gate's borderline band (further from the training films than most), a heat map mostly outside the lungs. A film
with none gets none.

Every output carries :attr:`Decision.text` verbatim: the headline, the summary table, the CSV, the result JSON, the
heat-map PNG caption and the DICOM SR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Within this distance of the threshold a small change in the film, or a calibration fitted elsewhere, flips the
# answer: on the held-out sources the calibration error was 0.11-0.26, so five points is a modest margin.
NEAR_THRESHOLD = 0.05
LUNG_SHARE_LIMIT = 0.5
NEAR = "COVID probability close to the threshold"
UNUSUAL = "unusual film for this model"
OUTSIDE_LUNGS = "heat map mostly outside the lungs"
HIGH, LOW = 0.99, 0.01


def probability(value: Any, decimals: int = 0) -> str:
    """A probability as a percentage that never reads 100% or 0%: "> 99%", "< 1%", else e.g. "73%" / "73.4%".

    A softmax output of 0.9996 is not a certainty, and a test set of a few hundred films cannot support one; every
    probability the page, its downloads and the captions print goes through here.

    Args:
        value: a probability in ``[0, 1]``.
        decimals: decimals of the percentage between 1% and 99%.

    Returns:
        The text, or "–" when the value is not a number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    if value > HIGH:
        return "> 99%"
    if value < LOW:
        return "< 1%"
    return f"{100 * value:.{decimals}f}%"


@dataclass(frozen=True)
class OperatingPoint:
    """Where the model says "COVID: yes".

    Attributes:
        positive: the COVID class, or None when the model has none.
        threshold: the COVID probability from which the answer is yes, or None (the most likely class decides).
        chosen_on: where the threshold was fixed ("Youden's J on the held-out sources"), or "".
    """

    positive: str | None
    threshold: float | None = None
    chosen_on: str = ""

    def rule(self) -> str:
        """The rule in one sentence, as the model tab and the film's text state it."""
        if self.positive is None:
            return "The model has no COVID class; it names the most likely class."
        if self.threshold is None:
            return (f"No COVID threshold was fixed for this model, so it says 'COVID: yes' when {self.positive} is "
                    "the most likely class.")
        where = f", fixed before testing ({self.chosen_on})" if self.chosen_on else ", fixed before testing"
        return (f"It says 'COVID: yes' when the COVID probability is at least {100 * self.threshold:.0f}%{where}; "
                "otherwise 'COVID: no' and the most likely other class.")


def operating_point(classes: Sequence[str], evaluation: Mapping[str, Any] | None) -> OperatingPoint:
    """The shipped operating point of a checkpoint: its stored evaluation summary's ``covid_vs_rest`` threshold.

    Args:
        classes: the model's classes.
        evaluation: the checkpoint's evaluation summary (``Predictor.metrics``), or None when not evaluated.
    """
    block = (evaluation or {}).get("covid_vs_rest") if isinstance(evaluation, Mapping) else None
    block = block if isinstance(block, Mapping) else {}
    positive = block.get("positive") if block.get("positive") in classes else None
    positive = positive or next((c for c in classes if "covid" in c.lower()), None)
    threshold = block.get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) and positive is not None else None
    return OperatingPoint(positive, threshold, str(block.get("chosen_on") or "") if threshold is not None else "")


@dataclass(frozen=True)
class Decision:
    """What the model says about one assessed film, in the words every output uses.

    Attributes:
        covid: True for "COVID: yes", False for "COVID: no", None when the model has no COVID class.
        label: the class named: the COVID class when yes, else the most likely other class.
        probability: the COVID probability (the named class's when there is no COVID class).
        point: the operating point applied.
        cautions: what about this film calls for care, in words (empty when nothing does).
    """

    covid: bool | None
    label: str
    probability: float
    point: OperatingPoint
    cautions: tuple[str, ...] = ()

    @property
    def headline(self) -> str:
        """"COVID: yes", "COVID: no; most likely pneumonia" (or "Most likely: X" without a COVID class)."""
        if self.covid is None:
            return f"Most likely: {self.label}"
        return "COVID: yes" if self.covid else f"COVID: no; most likely {self.label}"

    @property
    def figures(self) -> str:
        """The number behind the answer: "COVID probability 12% (yes from 38%)"."""
        if self.covid is None:
            return f"{self.label} probability {probability(self.probability)}"
        rule = (f"yes from {probability(self.point.threshold)}" if self.point.threshold is not None
                else "yes when it is the most likely class")
        return f"COVID probability {probability(self.probability)} ({rule})"

    @property
    def text(self) -> str:
        """The headline with its cautions: the words every output carries."""
        return self.headline + (f"; caution: {'; '.join(self.cautions)}" if self.cautions else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the result download)."""
        return {"text": self.text, "covid": self.covid, "label": self.label, "covid_probability": self.probability,
                "threshold": self.point.threshold, "threshold_chosen_on": self.point.chosen_on or None,
                "cautions": list(self.cautions)}


def decide(probs: Mapping[str, float], point: OperatingPoint, *, borderline: bool = False,
           lung_share: float | None = None) -> Decision:
    """The decision on one assessed film.

    Args:
        probs: class -> calibrated probability.
        point: the operating point (:func:`operating_point`).
        borderline: the input gate put the film in its borderline band (assessed, further out than most).
        lung_share: the share of the heat map inside the lungs, or None when not measured.

    Returns:
        The decision with the film's cautions.
    """
    if point.positive is None or point.positive not in probs:
        label = max(probs, key=lambda c: probs[c])
        return Decision(None, label, float(probs[label]), point, _cautions(None, point, borderline, lung_share))
    p = float(probs[point.positive])
    others = {c: v for c, v in probs.items() if c != point.positive}
    runner_up = max(others, key=lambda c: others[c]) if others else point.positive
    if point.threshold is not None:
        covid = p >= point.threshold
        margin = abs(p - point.threshold)
    else:
        covid = not others or p >= others[runner_up]
        margin = None  # no threshold: nothing to be close to
    cautions = _cautions(margin, point, borderline, lung_share)
    return Decision(covid, point.positive if covid else runner_up, p, point, cautions)


def _cautions(margin: float | None, point: OperatingPoint, borderline: bool,
              lung_share: float | None) -> tuple[str, ...]:
    """The film's cautions, in a fixed order."""
    near = margin is not None and margin < NEAR_THRESHOLD
    return tuple(words for flag, words in ((near, NEAR), (borderline, UNUSUAL),
                                           (lung_share is not None and lung_share < LUNG_SHARE_LIMIT, OUTSIDE_LUNGS))
                 if flag)


def decide_prediction(prediction: Any, point: OperatingPoint, lung_share: float | None = None) -> Decision:
    """:func:`decide` for a ``covidxr.inference.prediction.Prediction``: its probabilities, the gate's borderline
    band, and ``lung_share`` (default: the prediction's own, measured by a lung-cropping checkpoint)."""
    gate = getattr(prediction, "gate", None)
    share = lung_share if lung_share is not None else getattr(prediction, "lung_share", None)
    return decide(prediction.probs, point, borderline=bool(gate is not None and gate.borderline), lung_share=share)
