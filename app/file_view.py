"""One uploaded file's box: the verdict or the model's output in words, its probabilities, the image, the heat map.

:func:`render_upload` is the single code path for every uploaded file (browser uploads and AppTest uploads alike).
A refused image ("Not assessed: REASON") shows no class and no probability; its output stays behind the
"Show the model's output anyway" toggle. The work itself (reading, predicting, auditing) is :mod:`app.analysis`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from app.analysis import Context, FileResult, Upload, analyse, audit, decode
from app.assessment import BORDERLINE, Assessment
from app.evaluation import Evaluation, reliability_line
from app.format import escape_markdown, probability
from app.headline import caution_notes, figures_line
from app.heatmap import (
    CAM_LABELS,
    DISPLAY_MAX_SIDE,
    cam_settings,
    display_heatmap,
    display_image,
    heatmap_share,
    overlay_png,
    render_controls,
    render_heatmap,
)
from app.redact import strip_paths
from covidxr.errors import CovidxrError
from covidxr.images.reader import Xray
from covidxr.inference.decision import Decision, OperatingPoint, decide_prediction
from covidxr.inference.dicom_out import caption_lines, dicom_zip, read_header
from covidxr.inference.prediction_log import safe_header

if TYPE_CHECKING:
    from covidxr.inference.predictor import Prediction

log = logging.getLogger("covidxr.app")

INTENDED_USE = ("Research and education only. This is not a medical device and must not be used for diagnosis, "
                "triage or any clinical decision.")


def _gate_notes(assessment: Assessment) -> None:
    """The gate's caveats (a small image; an unusual film is one of the decision's cautions) and, when its learned
    checks did not run, why."""
    for warning in assessment.warnings:
        if not (assessment.borderline and warning.lower().startswith(BORDERLINE.split(":")[0])):
            st.caption(f"Caution: {warning}.")
    if assessment.note:
        st.caption(f"Input gate: {assessment.note}.")


def _headline(decision: Decision, prediction: Prediction, assessment: Assessment, evaluation: Evaluation | None,
              point: OperatingPoint) -> None:
    """The decision in the words every download carries, the figures behind it, one line on how such answers did
    on films from hospitals the model never saw, and what this film's cautions mean."""
    st.markdown(f"### {decision.text}")
    st.markdown(figures_line(decision, prediction.probs))
    st.markdown(reliability_line(evaluation, point))
    for note in caution_notes(decision):
        st.markdown(note)
    _gate_notes(assessment)
    st.caption(f"{point.rule()} A research result, not a diagnosis.")


REFUSAL_HEADING = "Not assessed"


def _not_assessed(assessment: Assessment, upload: Upload) -> bool:
    """The refusal in place of the headline (red, with a stop icon, its words saying the same for screen readers);
    returns whether the user asked to see the model's output anyway."""
    st.error(f"### {REFUSAL_HEADING}: {assessment.reason}", icon=":material/block:")
    st.caption(f"The input gate ({assessment.by}) found that this is not an image the model was made for (a "
               "frontal chest X-ray), so its output would mean nothing and is not shown.")
    _gate_notes(assessment)
    return st.toggle("Show the model's output anyway", key=f"{upload.key}:anyway",
                     help="For checking the model's behaviour only: the output of a refused image is unreliable.")


def _probabilities(prediction: Prediction, classes: list[str]) -> None:
    """A bar chart of all class probabilities on a fixed 0-100% scale, the predicted class highlighted."""
    import altair as alt

    probs = [float(prediction.probs.get(c, 0.0)) for c in classes]
    table = pd.DataFrame({"class": classes, "percent": [100 * p for p in probs],
                          "label": [probability(p, 1) for p in probs]})
    table["predicted"] = table["class"] == prediction.label
    base = alt.Chart(table).encode(
        y=alt.Y("class:N", sort=classes, title=None, axis=alt.Axis(labelFontSize=14, labelOverlap=False)),
        x=alt.X("percent:Q", scale=alt.Scale(domain=[0, 100]), title="probability (%)"),
        tooltip=["class", "label"])
    bars = base.mark_bar().encode(color=alt.condition("datum.predicted", alt.value("#1f5fa8"), alt.value("#a9bfd8")))
    text = base.mark_text(align="left", dx=4, fontSize=13).encode(text="label:N")
    # Streamlit fits the whole chart (axis included) into this height: about 40 px per bar after the x axis
    chart = (bars + text).properties(height=40 * len(classes) + 60,
                                     padding={"left": 6, "right": 14, "top": 4, "bottom": 4})
    st.altair_chart(chart, width="stretch", alt="Bar chart of the probability of each class")
    st.caption("Probabilities: " + " · ".join(f"{c} {probability(p, 1)}" for c, p in zip(classes, probs,
                                                                                          strict=True)))


def _header_table(xray: Xray) -> None:
    """The non-identifying DICOM header fields (``Xray.header`` only)."""
    if xray.format != "DICOM":
        return
    header = safe_header(xray.header)
    st.markdown("**DICOM header** (technical fields only; patient details are never read out)")
    st.table(pd.DataFrame({"field": list(header), "value": list(header.values())}).set_index("field"),
             alt="Technical DICOM header fields of the image")


def _image(xray: Xray, picture: np.ndarray, assessment: Assessment) -> None:
    """The image as read (``picture``: at display size), with its size and how it was read; its alt text says what
    it is."""
    from covidxr.explain.display import overlay

    height, width = xray.pixels.shape
    caption = "Image as read" + (" (DICOM, windowed by the reader)" if xray.format == "DICOM" else "")
    st.image(overlay(picture, None, max_side=DISPLAY_MAX_SIDE), caption=f"{caption}, {width} x {height} px",
             width="stretch", alt=image_alt(assessment, width, height), output_format="JPEG")
    _header_table(xray)


def image_alt(assessment: Assessment, width: int, height: int) -> str:
    """The alt text of the uploaded image: what it is, as the page knows (the refusal reason for a refused
    image, which may be a CT slice or a photograph)."""
    size = f"{width} by {height} pixels, without heat map"
    if not assessment.assessable:
        return f"The uploaded image, not assessed ({assessment.reason.rstrip('.')}), {size}"
    marked = ", marked as an unusual film" if assessment.borderline else ""
    return f"The uploaded chest X-ray{marked}, {size}"


def result_dict(upload: Upload, xray: Xray, image_sha: str, prediction: Prediction, assessment: Assessment,
                ctx: Context, decision: Decision | None, lung_share: float | None = None) -> dict[str, Any]:
    """The downloadable JSON result of one file (no heat map array, no patient data): the decision in the page's
    words (None for a refused image), the verdict, the probabilities, the image and the model."""
    predictor = ctx.predictor
    shown = ("probs", "cam_method", "cam_class", "note", "lung_share")  # no argmax label beside the decision
    return {
        "file": upload.name,
        "intended_use": INTENDED_USE,
        "decision": None if decision is None else decision.to_dict(),
        "verdict": assessment.to_dict(),
        "prediction": {k: v for k, v in prediction.to_dict().items() if k in shown},
        "cam_share_in_lungs": lung_share,
        "image": {"sha256_of_pixels": image_sha, "shape": list(xray.pixels.shape), "format": xray.format,
                  "dicom_header": safe_header(xray.header)},
        "model": {"arch": predictor.arch, "classes": list(predictor.classes),
                  "checkpoint_sha256": predictor.checkpoint_sha256, "preprocess": predictor.preprocess.to_dict(),
                  "temperature": predictor.temperature, "covid_rule": predictor.operating_point.rule()},
    }


def _downloads(upload: Upload, xray: Xray, prediction: Prediction, result: dict[str, Any], lines: list[str],
               alpha: float) -> None:
    """Download buttons: the result JSON and the captioned heat-map PNG (made only when clicked)."""
    stem = Path(upload.name).stem or "image"
    cols = st.columns(2)
    cols[0].download_button("Download result (JSON)", strip_paths(json.dumps(result, indent=2, default=str)),
                            file_name=f"{stem}_result.json", mime="application/json", key=f"{upload.key}:json",
                            on_click="ignore", icon=":material/download:")
    heatmap = prediction.heatmap
    cols[1].download_button(
        "Download heat map (PNG)", (lambda: overlay_png(xray.pixels, heatmap, alpha, lines)),
        file_name=f"{stem}_{prediction.cam_method or 'cam'}.png", mime="image/png", key=f"{upload.key}:png",
        on_click="ignore", icon=":material/download:", disabled=heatmap is None)


def _dicom_download(upload: Upload, xray: Xray, prediction: Prediction, ctx: Context,
                    overlay: Callable[[], bytes] | None, decision: Decision | None) -> None:
    """For a DICOM upload: a ZIP of the DICOM SR (with the page's decision) and, for an assessed image, the Secondary
    Capture of the labelled heat map (``overlay`` makes its PNG), in the upload's study; made only when clicked."""
    if xray.format != "DICOM":
        return
    try:
        read_header(upload.data, upload.name)  # cheap: can the results be filed in its study at all?
    except CovidxrError as exc:
        st.caption(f"No DICOM download: {exc}.")
        return
    stem = Path(upload.name).stem or "image"
    st.download_button(
        "Download as DICOM",
        lambda: dicom_zip(upload.data, prediction, ctx.predictor, None if overlay is None else overlay(), stem,
                          decision),
        file_name=f"{stem}_dicom.zip", mime="application/zip", key=f"{upload.key}:dicom", on_click="ignore",
        icon=":material/download:", help="A DICOM Structured Report (and, for an assessed image, a Secondary Capture "
                                         "of the labelled heat map) in the study of the uploaded file; research use "
                                         "only")


def _output(upload: Upload, xray: Xray, ctx: Context, evaluation: Evaluation | None) -> FileResult:
    """Predict and decide, then lay out the verdict or the decision first (it reaches the browser before any picture
    is encoded), the probabilities, the image and the heat map."""
    classes = list(ctx.predictor.classes)
    cam, cam_class = cam_settings(upload, ctx.predictor)
    prediction, assessment, sha = analyse(upload, xray, cam, cam_class, ctx)
    point = ctx.predictor.operating_point
    share = heatmap_share(upload, xray, prediction, ctx)
    decision = decide_prediction(prediction, point, share) if assessment.assessable else None
    audit(ctx, upload, xray, sha, prediction, assessment, decision, cam, cam_class)
    if decision is not None:
        words_col, bars_col = st.columns(2, gap="large")
        with words_col:
            _headline(decision, prediction, assessment, evaluation, point)
        with bars_col:
            _probabilities(prediction, classes)
        show = True
    else:  # full width: no empty column beside the refusal on a narrow screen
        show = _not_assessed(assessment, upload)
        if show:
            st.warning("Shown on request for an image the model was not made for: do not read anything into it.",
                       icon=":material/warning:")
            _probabilities(prediction, classes)
    image_col, cam_col = st.columns(2, gap="large")
    picture = display_image(upload, xray, ctx)
    with image_col:
        _image(xray, picture, assessment)
    if not show:
        _dicom_download(upload, xray, prediction, ctx, None, None)
        return FileResult(upload.name, prediction, assessment, sha)
    with cam_col:
        heat_slot = st.container()
        alpha = render_controls(upload, classes, ctx.predictor)
    with heat_slot:
        render_heatmap(picture, display_heatmap(upload, prediction, ctx), prediction, alpha, share,
                       refused=not assessment.assessable)
    lines = caption_lines(prediction, ctx.predictor, decision, method=CAM_LABELS.get(prediction.cam_method or ""),
                          lung_share=share)
    _downloads(upload, xray, prediction,
               result_dict(upload, xray, sha, prediction, assessment, ctx, decision, share), lines, alpha)
    _dicom_download(upload, xray, prediction, ctx, (lambda: overlay_png(xray.pixels, prediction.heatmap, alpha, lines))
                    if assessment.assessable else None, decision)
    return FileResult(upload.name, prediction, assessment, sha, decision=decision)


def render_upload(upload: Upload, ctx: Context, evaluation: Evaluation | None) -> FileResult:
    """Show one uploaded file in its own box; never raises (other files keep working).

    Returns:
        The file's outcome (with its error when it could not be read or processed).
    """
    with st.container(border=True, key=f"filebox-{upload.key}"):
        st.markdown(f"**File:** {escape_markdown(upload.name)}")  # small: the verdict is the box's heading
        xray = decode(upload, ctx)
        if isinstance(xray, str):
            st.error(xray)
            return FileResult(upload.name, error=xray.removeprefix(f"{upload.name}: "))
        try:
            return _output(upload, xray, ctx, evaluation)
        except CovidxrError as exc:
            st.error(f"{upload.name}: {exc}")
            return FileResult(upload.name, error=str(exc))
        except Exception:  # noqa: BLE001 - one bad file must not take the page down; details go to the server log
            reference = secrets.token_hex(4)
            log.exception("processing an upload failed (reference %s)", reference)
            st.error(f"{upload.name}: could not be processed because of an internal error (reference {reference}). "
                     "The other files are not affected.")
            return FileResult(upload.name, error=f"internal error (reference {reference})")
