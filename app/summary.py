"""The top of the "Analyse images" tab when several files are uploaded: one row per file, and the CSV of all rows.

An assessed film's row carries the decision in the words of its box (``covidxr.inference.decision``: "COVID: no;
most likely pneumonia; caution: ..."), so the table, the CSV and the box never disagree. A refused image's row says
"not assessed" with the reason and leaves the decision empty, as its box does; a file that could not be read is
listed as "failed" with its error, in the table and in the CSV.
"""

from __future__ import annotations

import pandas as pd

from app.analysis import FileResult
from app.format import probability

SUMMARY_COLUMNS = ["File", "Verdict", "Decision", "COVID probability", "Reason or error"]


def _reason(result: FileResult) -> str:
    """The refusal reason, the error, or the gate's other caveats (a small image) of an assessed film."""
    if result.error or (result.assessment and not result.assessment.assessable):
        return result.error or (result.assessment.reason if result.assessment else "")
    return "; ".join(result.assessment.warnings) if result.assessment else ""


def summary_frame(results: list[FileResult]) -> pd.DataFrame:
    """One display row per file: file, verdict, the decision's words, the COVID probability (never 100%), gate
    reason or error."""
    rows = []
    for result in results:
        decision = result.decision if result.verdict == "assessed" else None
        marked = decision is not None and result.assessment is not None and result.assessment.borderline
        rows.append({"File": result.name, "Verdict": "assessed, unusual film" if marked else result.verdict,
                     "Decision": decision.text if decision else "",
                     "COVID probability": probability(decision.probability) if decision else "",
                     "Reason or error": _reason(result)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def results_csv(results: list[FileResult], classes: list[str]) -> bytes:
    """All files as CSV: verdict, reason or error, then (for assessed films) the decision and the model's output.

    ``decision`` holds the page's words (cautions included), ``covid`` yes/no, ``covid_probability`` the page's
    text ("> 99%"), ``threshold`` the COVID threshold applied; ``p_CLASS`` are the full-precision probabilities.
    Refused and failed files keep their row with the model's output left empty.

    Args:
        results: the files' outcomes, in page order.
        classes: the model's classes (column order).

    Returns:
        UTF-8 CSV bytes.
    """
    rows = []
    for result in results:
        prediction, assessment = result.prediction, result.assessment
        decision = result.decision if result.verdict == "assessed" else None
        shown = decision is not None and prediction is not None
        row = {"file": result.name, "verdict": result.verdict,
               "reason": assessment.reason if assessment else "", "error": result.error or "",
               "decision": decision.text if decision else "",
               "covid": ("" if decision.covid is None else "yes" if decision.covid else "no") if decision else "",
               "cautions": " | ".join(decision.cautions) if decision else "",
               "covid_probability": probability(decision.probability) if decision else "",
               "threshold": decision.point.threshold if decision else None}
        row |= {f"p_{c}": prediction.probs.get(c) if shown else None for c in classes}
        row |= {"cam_method": prediction.cam_method if shown else None,
                "cam_class": prediction.cam_class if shown else None,
                "warnings": " | ".join(assessment.warnings) if assessment else "",
                "image_sha256": result.image_sha256}
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")
