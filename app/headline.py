"""The headline of an assessed file: the class, and in words next to it why it should not be taken at face value.

A rule, kept small and pure (:func:`headline`): the headline names the class with the percentage beside it, unless
the model is known to be unreliable for this film; then it says *leans towards CLASS* with the caveats in words next
to it, and the percentage moves to the line below. The caveats:

- the model's probabilities were poorly calibrated on films from hospitals it never saw: expected calibration error
  above :data:`ECE_LIMIT` on an external test set (or held-out-source results), the worst one counting;
- the heat map lies mostly outside the lungs: less than :data:`LUNG_SHARE_LIMIT` of its mass inside them (only
  when a lung model measured it);
- the input gate marked the film as unusual (the borderline band).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.format import probability

ECE_LIMIT = 0.10
LUNG_SHARE_LIMIT = 0.5
OTHER_HOSPITALS = "low confidence on films from other hospitals"
OUTSIDE_LUNGS = "the heat map lies mostly outside the lungs"
UNUSUAL = "unusual film"


@dataclass(frozen=True)
class Headline:
    """What the headline says.

    Attributes:
        title: the headline's markdown ("Model output: **pneumonia** (91%)" or "Leans towards **pneumonia**; low
            confidence on films from other hospitals").
        below: the percentage line under a cautious headline ("" when the percentage is in the title).
        cautions: the caveats named in the title (empty when none).
    """

    title: str
    below: str
    cautions: tuple[str, ...]


def headline(label: str, confidence: float, external_ece: float | None = None, lung_share: float | None = None,
             borderline: bool = False) -> Headline:
    """The headline of one assessed prediction.

    Args:
        label: the predicted class.
        confidence: its probability.
        external_ece: the worst expected calibration error measured on films from other hospitals, or None.
        lung_share: the share of the heat map inside the lungs, or None when not measured.
        borderline: the input gate marked the film as unusual.
    """
    cautions = tuple(words for cond, words in (
        (external_ece is not None and external_ece > ECE_LIMIT, OTHER_HOSPITALS),
        (lung_share is not None and lung_share < LUNG_SHARE_LIMIT, OUTSIDE_LUNGS),
        (borderline, UNUSUAL)) if cond)
    if not cautions:
        return Headline(f"Model output: **{label}** ({probability(confidence)})", "", ())
    return Headline(f"Leans towards **{label}**; " + "; ".join(cautions),
                    f"The model's probability for {label}: {probability(confidence)}, not to be taken at face value "
                    "(see the caution next to it).", cautions)
