"""The top of the "Analyse images" tab when several files are uploaded: one row per file, and the CSV of all rows.

A refused image's row says "not assessed" with the reason and leaves class and probability empty, as its box does;
a file that could not be read is listed as "failed" with its error, in the table and in the CSV.
"""

from __future__ import annotations

import pandas as pd

from app.analysis import FileResult
from app.format import probability

SUMMARY_COLUMNS = ["File", "Verdict", "Class", "Probability", "Reason or error"]


def summary_frame(results: list[FileResult]) -> pd.DataFrame:
    """One display row per file: file, verdict, class, probability (never 100%), gate reason or error."""
    rows = []
    for result in results:
        shown = result.verdict == "assessed" and result.prediction is not None
        reason = result.error or (result.assessment.reason if result.assessment else "")
        if shown and result.assessment and result.assessment.warnings:
            reason = "; ".join(result.assessment.warnings)
        marked = shown and result.assessment is not None and result.assessment.borderline
        rows.append({"File": result.name, "Verdict": "assessed, unusual film" if marked else result.verdict,
                     "Class": result.prediction.label if shown else "",
                     "Probability": probability(result.prediction.confidence) if shown else "",
                     "Reason or error": reason})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def results_csv(results: list[FileResult], classes: list[str]) -> bytes:
    """All files as CSV: verdict and reason or error first, then (for assessed images) the model's output.

    ``probability`` is the page's text ("> 99%"); ``confidence`` and ``p_CLASS`` are the full-precision numbers.
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
        shown = result.verdict == "assessed" and prediction is not None
        row = {"file": result.name, "verdict": result.verdict,
               "reason": assessment.reason if assessment else "", "error": result.error or "",
               "predicted_class": prediction.label if shown else "",
               "probability": probability(prediction.confidence) if shown else "",
               "confidence": prediction.confidence if shown else None}
        row |= {f"p_{c}": prediction.probs.get(c) if shown else None for c in classes}
        row |= {"cam_method": prediction.cam_method if shown else None,
                "cam_class": prediction.cam_class if shown else None,
                "warnings": " | ".join(assessment.warnings) if assessment else "",
                "image_sha256": result.image_sha256}
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")
