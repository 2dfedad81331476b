"""One uploaded file on the page: read it, predict, explain, offer downloads; "not assessed" when the input gate
(``covidxr.inference.gate``) refuses it, with the model's output only behind an explicit toggle.

:func:`render_upload` is the single code path for every uploaded file (browser uploads and AppTest uploads alike).
Reading, preprocessing, prediction and Grad-CAM are the package's (``covidxr.io``, ``covidxr.inference.predictor``,
``covidxr.explain``); this module only lays out their results and keeps them in the browser session's memory.
Nothing an upload contains is written to disk; the audit log gets one privacy-safe record per prediction.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from covidxr.errors import CovidxrError
from covidxr.inference.prediction_log import (
    PredictionLog,
    PredictionLogError,
    pixel_sha256,
    prediction_record,
    safe_header,
)
from covidxr.io import MAX_FILE_BYTES, Xray, load_xray

if TYPE_CHECKING:  # torch and friends load on first use, so the page shows its first lines at once
    from covidxr.inference.gate import GateVerdict
    from covidxr.inference.predictor import Prediction, Predictor

log = logging.getLogger("covidxr.app")

INTENDED_USE = ("Research and education only. This is not a medical device and must not be used for diagnosis, "
                "triage or any clinical decision.")
DISPLAY_MAX_SIDE = 1024
DOWNLOAD_MAX_SIDE = 2048
SLOW_ON_CPU = frozenset({"scorecam"})
CAM_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
              "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM (slow)"}


@dataclass(frozen=True)
class Upload:
    """One uploaded file, held in memory.

    Attributes:
        name: the file name the browser sent (shown to the user, never logged).
        data: the file's bytes.
        key: a stable identifier of this upload (the uploader's file id), used to key its widgets and cache.
    """

    name: str
    data: bytes
    key: str


@dataclass
class Context:
    """What every file's rendering needs.

    Attributes:
        predictor: the loaded ``covidxr.inference.predictor.Predictor`` (shared by all sessions; it serialises its
            model calls).
        model_key: identifies the loaded checkpoint (path and mtime) in the session cache.
        audit: the audit log, or None when it is disabled.
        session_id: random id of this browser session.
        store: this session's cache of decoded images and predictions.
        audit_errors: audit failures during this run (shown once by the page).
    """

    predictor: Predictor
    model_key: str
    audit: PredictionLog | None
    session_id: str
    store: MutableMapping[Any, Any]
    audit_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileResult:
    """A prediction shown on the page (a row of the CSV download)."""

    name: str
    image_sha256: str
    prediction: Prediction
    warnings: tuple[str, ...]


def input_warnings(verdict: GateVerdict) -> list[str]:
    """The input gate's verdict as page and audit messages: why it refused the image, and caveats that do not refuse
    (no file names, so they may go into the audit log)."""
    return [f"Not assessed: {reason}." for reason in verdict.reasons] + [w[:1].upper() + w[1:] + "."
                                                                          for w in verdict.warnings]


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an 8-bit image as PNG in memory."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(upload: Upload, ctx: Context) -> Xray | str:
    """Read an upload once per session (cached); a readable error message instead of an exception.

    Args:
        upload: the file.
        ctx: the rendering context.

    Returns:
        The decoded image, or a one-line error message.
    """
    key = ("xray", upload.key)
    if key not in ctx.store:
        if len(upload.data) > MAX_FILE_BYTES:
            ctx.store[key] = (f"{upload.name}: the file is {len(upload.data) / 2**20:.0f} MB, over the limit of "
                              f"{MAX_FILE_BYTES // 2**20} MB")
        else:
            try:
                ctx.store[key] = load_xray(upload.data, name=upload.name)
            except CovidxrError as exc:
                ctx.store[key] = str(exc)
    return ctx.store[key]


def _audit(ctx: Context, xray: Xray, image_sha: str, prediction: Prediction, warnings: list[str]) -> None:
    """Append the prediction's audit record; remember a failure for the page to show."""
    if ctx.audit is None:
        return
    predictor = ctx.predictor
    record = prediction_record(
        session_id=ctx.session_id, image_sha256=image_sha, image_shape=xray.pixels.shape,
        image_format=xray.format, header=xray.header, arch=predictor.arch,
        checkpoint_sha256=predictor.checkpoint_sha256, classes=predictor.classes,
        preprocess=predictor.preprocess.to_dict(), temperature=predictor.temperature,
        probabilities=prediction.probs, label=prediction.label, confidence=prediction.confidence,
        cam_method=prediction.cam_method, cam_class=prediction.cam_class, warnings=warnings)
    try:
        ctx.audit.append(record)
    except PredictionLogError as exc:
        log.error("audit log: %s", exc)
        ctx.audit_errors.append(str(exc))


def _predict(upload: Upload, xray: Xray, cam: str | None, cam_class: str | None,
             ctx: Context) -> tuple[Prediction, str]:
    """Predict (and explain) once per upload, method and class in this session; audit each new prediction.

    Returns:
        ``(prediction, SHA-256 of the pixels)``.
    """
    sha_key = ("sha", upload.key)
    if sha_key not in ctx.store:
        ctx.store[sha_key] = pixel_sha256(xray.pixels)
    key = ("prediction", upload.key, ctx.model_key, cam, cam_class)
    if key not in ctx.store:
        with st.spinner(f"Analysing {upload.name}..."):
            prediction = ctx.predictor.predict(xray, cam=cam, cam_class=cam_class, name=upload.name)
        ctx.store[key] = prediction
        _audit(ctx, xray, ctx.store[sha_key], prediction, input_warnings(prediction.gate))
    return ctx.store[key], ctx.store[sha_key]


def cam_choices(predictor: Predictor) -> list[str | None]:
    """The explanation methods offered: all of them on a GPU; on the CPU all but Score-CAM.

    Score-CAM runs one forward pass per feature map (2048 for ResNet-50): many minutes on a CPU, during which the
    shared model would be busy for every other user.

    Args:
        predictor: the loaded predictor.

    Returns:
        Method names, then None for "off".
    """
    from covidxr.explain.cam import CAM_METHODS

    on_cpu = getattr(getattr(predictor, "device", None), "type", "cpu") == "cpu"
    return [m for m in CAM_METHODS if not (on_cpu and m in SLOW_ON_CPU)] + [None]


def _controls(upload: Upload, classes: list[str], methods: list[str | None]) -> tuple[str | None, str | None, float]:
    """The explanation controls of one file (keyed per upload so several files work independently).

    Returns:
        ``(CAM method or None, class to explain or None for the predicted class, overlay opacity)``.
    """
    cols = st.columns(2)
    cam = cols[0].selectbox("Explanation method", methods, key=f"{upload.key}:cam",
                            format_func=lambda m: "Off" if m is None else CAM_LABELS.get(m, m),
                            help="How the heat map is computed. Grad-CAM is the usual choice.")
    cam_class = cols[1].selectbox("Class to explain", [None, *classes], key=f"{upload.key}:class",
                                  format_func=lambda c: "the predicted class" if c is None else c,
                                  help="Show which regions pushed the model towards this class.")
    alpha = st.slider("Heat-map opacity", 0.0, 1.0, 0.4, 0.05, key=f"{upload.key}:alpha")
    return cam, cam_class, alpha


def _gate(upload: Upload, verdict: GateVerdict, predictor: Predictor) -> bool:
    """"Not assessed: REASON" for an image the input gate refused; whether to show the model's output (always for an
    assessed image; for a refused one only when the user asks for it)."""
    if not verdict.learned:
        st.caption(f"Input gate: {predictor.gate.unavailable}.")
    if verdict.assessable:
        return True
    st.error(f"**Not assessed:** {verdict.reason}.", icon=":material/block:")
    st.caption("The input gate found that this is not an assessable frontal chest radiograph, the only kind of "
               "image the model was made for, so its output is not a result.")
    return st.toggle("Show the model's output anyway", key=f"{upload.key}:anyway")


def _headline(prediction: Prediction) -> None:
    """The prediction, prominent, with its probability and a reminder of what it is."""
    st.markdown(f"### Model output: **{prediction.label}** ({prediction.confidence:.0%})")
    if prediction.confidence < 0.5:
        st.caption("The model is uncertain: no class reaches 50%.")
    st.caption("The most likely class according to the model, with its probability. A research result, "
               "not a diagnosis.")


def _probabilities(prediction: Prediction, classes: list[str]) -> None:
    """A bar chart of all class probabilities on a fixed 0-100% scale, the predicted class highlighted."""
    import altair as alt

    table = pd.DataFrame({"class": classes, "percent": [100 * float(prediction.probs.get(c, 0.0)) for c in classes]})
    table["label"] = [f"{p:.1f}%" for p in table["percent"]]
    table["predicted"] = table["class"] == prediction.label
    base = alt.Chart(table).encode(
        y=alt.Y("class:N", sort=classes, title=None, axis=alt.Axis(labelFontSize=14)),
        x=alt.X("percent:Q", scale=alt.Scale(domain=[0, 100]), title="probability (%)"),
        tooltip=["class", "label"])
    bars = base.mark_bar().encode(color=alt.condition("datum.predicted", alt.value("#1f5fa8"), alt.value("#a9bfd8")))
    text = base.mark_text(align="left", dx=4, fontSize=13).encode(text="label:N")
    st.altair_chart((bars + text).properties(height=40 * len(classes) + 40), width="stretch")
    st.caption("Probabilities: " + " · ".join(f"{c} {p:.1%}" for c, p in
                                                zip(classes, table["percent"] / 100, strict=True)))


def _header_table(xray: Xray) -> None:
    """The non-identifying DICOM header fields (``Xray.header`` only)."""
    if xray.format != "DICOM":
        return
    header = safe_header(xray.header)
    st.markdown("**DICOM header** (technical fields only; patient details are never read out)")
    st.table(pd.DataFrame({"field": list(header), "value": list(header.values())}).set_index("field"))


def _explanation(xray: Xray, prediction: Prediction, alpha: float) -> np.ndarray | None:
    """The heat map over the image, or None (with the reason shown) when there is none."""
    from covidxr.explain.display import overlay

    if prediction.heatmap is None:
        st.info(prediction.note or "Explanation is switched off.")
        return None
    rgb = overlay(xray.pixels, prediction.heatmap, alpha=alpha, max_side=DISPLAY_MAX_SIDE)
    method = CAM_LABELS.get(prediction.cam_method or "", prediction.cam_method)
    st.image(rgb, caption=f"{method} heat map for '{prediction.cam_class}'", width="stretch")
    st.caption("Red marks the regions that pushed the model most towards this class. It shows where the model "
               "looked, not where disease is.")
    return rgb


def result_dict(upload: Upload, xray: Xray, image_sha: str, prediction: Prediction, warnings: list[str],
                predictor: Predictor) -> dict[str, Any]:
    """The downloadable JSON result of one file (no heat map array, no patient data)."""
    pred = {k: v for k, v in prediction.to_dict().items() if k != "heatmap"}
    return {
        "file": upload.name,
        "intended_use": INTENDED_USE,
        "prediction": pred,
        "warnings": warnings,
        "image": {"sha256_of_pixels": image_sha, "shape": list(xray.pixels.shape), "format": xray.format,
                  "dicom_header": safe_header(xray.header)},
        "model": {"arch": predictor.arch, "classes": list(predictor.classes),
                  "checkpoint_sha256": predictor.checkpoint_sha256, "preprocess": predictor.preprocess.to_dict(),
                  "temperature": predictor.temperature},
    }


def _downloads(upload: Upload, xray: Xray, prediction: Prediction, result: dict[str, Any], alpha: float) -> None:
    """Download buttons: the result JSON and the overlay PNG (made only when clicked)."""
    from covidxr.explain.display import overlay

    stem = Path(upload.name).stem or "image"
    cols = st.columns(2)
    cols[0].download_button("Download result (JSON)", json.dumps(result, indent=2, default=str),
                            file_name=f"{stem}_result.json", mime="application/json", key=f"{upload.key}:json",
                            on_click="ignore", icon=":material/download:")
    heatmap = prediction.heatmap
    cols[1].download_button(
        "Download heat map (PNG)",
        (lambda: png_bytes(overlay(xray.pixels, heatmap, alpha=alpha, max_side=DOWNLOAD_MAX_SIDE))),
        file_name=f"{stem}_{prediction.cam_method or 'cam'}.png", mime="image/png", key=f"{upload.key}:png",
        on_click="ignore", icon=":material/download:", disabled=heatmap is None)


def _render(upload: Upload, ctx: Context) -> FileResult | None:
    """Lay out one file's result; errors reading the file are shown as one line."""
    from covidxr.explain.display import overlay

    xray = _decode(upload, ctx)
    if isinstance(xray, str):
        st.error(xray)
        return None
    classes = list(ctx.predictor.classes)
    notices = st.container()
    summary_left, summary_right = st.columns(2, gap="large")
    image_col, cam_col = st.columns(2, gap="large")
    with cam_col:
        overlay_slot = st.container()
        cam, cam_class, alpha = _controls(upload, classes, cam_choices(ctx.predictor))
    prediction, image_sha = _predict(upload, xray, cam, cam_class, ctx)
    verdict = prediction.gate
    warnings = input_warnings(verdict)
    for warning in verdict.warnings:
        notices.warning(warning[:1].upper() + warning[1:] + ".", icon=":material/warning:")
    with summary_left:
        shown = _gate(upload, verdict, ctx.predictor)
        if shown:
            _headline(prediction)
    if shown:
        with summary_right:
            _probabilities(prediction, classes)
    with image_col:
        height, width = xray.pixels.shape
        caption = "Image as read" + (" (DICOM, windowed by the reader)" if xray.format == "DICOM" else "")
        st.image(overlay(xray.pixels, None, max_side=DISPLAY_MAX_SIDE), caption=f"{caption}, {width} x {height} px",
                 width="stretch")
        _header_table(xray)
    with overlay_slot:
        if shown:
            _explanation(xray, prediction, alpha)
        else:
            st.info("No explanation: the image was not assessed.")
    result = result_dict(upload, xray, image_sha, prediction, warnings, ctx.predictor)
    _downloads(upload, xray, prediction, result, alpha)
    return FileResult(upload.name, image_sha, prediction, tuple(warnings))


def render_upload(upload: Upload, ctx: Context) -> FileResult | None:
    """Show one uploaded file in its own box; never raises (other files keep working).

    Args:
        upload: the file.
        ctx: the rendering context.

    Returns:
        The result, or None when the file could not be read or processed.
    """
    with st.container(border=True):
        st.subheader(upload.name, anchor=False)
        try:
            return _render(upload, ctx)
        except CovidxrError as exc:
            st.error(f"{upload.name}: {exc}")
        except Exception:  # noqa: BLE001 - one bad file must not take the page down; details go to the server log
            reference = secrets.token_hex(4)
            log.exception("processing an upload failed (reference %s)", reference)
            st.error(f"{upload.name}: could not be processed because of an internal error (reference {reference}). "
                     "The other files are not affected.")
        return None


def results_csv(results: list[FileResult], classes: list[str]) -> bytes:
    """All results as CSV: file, predicted class, probability of each class, explanation, warnings.

    Args:
        results: the files' results, in page order.
        classes: the model's classes (column order).

    Returns:
        UTF-8 CSV bytes.
    """
    rows = []
    for result in results:
        prediction = result.prediction
        row = {"file": result.name, "predicted_class": prediction.label if prediction.assessable else "",
               "gate": prediction.gate.status, "gate_reason": prediction.gate.reason,
               "confidence": prediction.confidence}
        row |= {f"p_{c}": prediction.probs.get(c) for c in classes}
        row |= {"cam_method": prediction.cam_method, "cam_class": prediction.cam_class,
                "warnings": " | ".join(result.warnings), "image_sha256": result.image_sha256}
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")
