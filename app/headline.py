"""The headline of an assessed film: the decision's words, the figure behind them, what its cautions mean.

The decision itself (COVID yes or no at the shipped threshold, the other classes, the film's cautions) is made once,
in ``covidxr.inference.decision``; this module only lays its words out on the page, so the headline, the summary
table, the CSV, the JSON, the PNG caption and the DICOM SR all carry the same text.
"""

from __future__ import annotations

from collections.abc import Mapping

from covidxr.inference.decision import NEAR, NEAR_THRESHOLD, OUTSIDE_LUNGS, UNUSUAL, Decision, probability

CAUTION_HELP = {
    NEAR: f"**Close to the threshold:** the COVID probability is within {100 * NEAR_THRESHOLD:.0f} points of it, so a "
          "slightly different film or calibration would give the other answer.",
    UNUSUAL: "**Unusual film: read with care.** The input gate found this film further from the films the model "
             "learned from than most (another hospital or scanner?); its answer is shown, marked.",
    OUTSIDE_LUNGS: "**Heat map mostly outside the lungs:** the model looked mostly elsewhere (markers, borders, "
                   "text), so its answer may not rest on the lungs.",
}


def figures_line(decision: Decision, probs: Mapping[str, float]) -> str:
    """The numbers under the headline: "COVID probability 12% (yes from 38%). Other classes: pneumonia 70%, ..."."""
    others = sorted(((c, p) for c, p in probs.items() if c != decision.point.positive), key=lambda cp: -cp[1])
    rest = ", ".join(f"{c} {probability(p)}" for c, p in others)
    return f"{decision.figures}." + (f" Other classes: {rest}." if rest and decision.covid is not None else "")


def caution_notes(decision: Decision) -> list[str]:
    """One sentence per caution of the film, saying what it means (none for a film without cautions)."""
    return [CAUTION_HELP.get(c, f"**Caution:** {c}.") for c in decision.cautions]
