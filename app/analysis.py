"""One uploaded file's work, without layout: read it, predict and explain it once, judge it, record it.

Everything is cached in the browser session's memory (``Context.store``), keyed by the upload, so moving a slider
redraws without predicting again. The audit log gets one ``prediction`` record per image and model, with the
decision in the words the page shows; asking for another explanation (method or class) adds a short ``explanation``
record, never another prediction record.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from app.assessment import Assessment, assess
from covidxr.errors import CovidxrError
from covidxr.images.reader import MAX_FILE_BYTES, Xray, load_xray
from covidxr.inference.prediction_log import (
    PredictionLog,
    PredictionLogError,
    explanation_record,
    pixel_sha256,
    prediction_record,
)

if TYPE_CHECKING:  # torch and friends load on first use, so the page shows its first lines at once
    from covidxr.inference.decision import Decision
    from covidxr.inference.predictor import Prediction, Predictor

log = logging.getLogger("covidxr.app")

# File name endings the uploader's picker offers; any other file is still read by its content (covidxr.images.reader
# decides), except a file without any extension, which waits for the "accept files without an extension" option.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".bmp", ".tif", ".tiff", ".webp",
                            ".jp2"})
NO_EXTENSION_HINT = ("has no file extension, so it was not read. If it is a DICOM file exported without '.dcm', tick "
                     "'Accept files without an extension' above the file list.")


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
    """What every file's analysis needs.

    Attributes:
        predictor: the loaded predictor (shared by all sessions; it serialises its model calls).
        model_key: identifies the loaded checkpoint (path and mtime) in the session cache.
        audit: the audit log, or None when it is disabled.
        session_id: random id of this browser session.
        store: this session's cache of decoded images and predictions.
        any_name: whether files without an extension are read.
        audit_errors: audit failures during this run (shown once by the page).
    """

    predictor: Predictor
    model_key: str
    audit: PredictionLog | None
    session_id: str
    store: MutableMapping[Any, Any]
    any_name: bool = False
    audit_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: a row of the summary table and of the CSV download.

    Attributes:
        name: the file name.
        prediction: the model's output, or None when the file failed.
        assessment: the verdict on the image, or None when the file failed.
        image_sha256: SHA-256 of the decoded pixels ("" when the file failed).
        error: why the file failed, or None.
        decision: what the page said about an assessed film (``covidxr.inference.decision``), or None.
    """

    name: str
    prediction: Prediction | None = None
    assessment: Assessment | None = None
    image_sha256: str = ""
    error: str | None = None
    decision: Decision | None = None

    @property
    def verdict(self) -> str:
        """"assessed", "not assessed" or "failed"."""
        if self.error is not None or self.assessment is None:
            return "failed"
        return "assessed" if self.assessment.assessable else "not assessed"


def decode(upload: Upload, ctx: Context) -> Xray | str:
    """Read an upload once per session (cached); a one-line error message instead of an exception.

    Returns:
        The decoded image, or the message (it starts with the file name).
    """
    key = ("xray", upload.key, ctx.any_name)
    if key not in ctx.store:
        if not PurePath(upload.name).suffix and not ctx.any_name:
            ctx.store[key] = f"{upload.name}: {NO_EXTENSION_HINT}"
        elif len(upload.data) > MAX_FILE_BYTES:
            ctx.store[key] = (f"{upload.name}: the file is {len(upload.data) / 2**20:.0f} MB, over the limit of "
                              f"{MAX_FILE_BYTES // 2**20} MB")
        else:
            try:
                ctx.store[key] = load_xray(upload.data, name=upload.name)
            except CovidxrError as exc:
                ctx.store[key] = str(exc)
    return ctx.store[key]


def _append(ctx: Context, record: dict[str, Any]) -> None:
    """Append an audit record; remember a failure for the page to show."""
    if ctx.audit is None:
        return
    try:
        ctx.audit.append(record)
    except PredictionLogError as exc:
        log.error("audit log: %s", exc)
        ctx.audit_errors.append(str(exc))


def audit(ctx: Context, upload: Upload, xray: Xray, sha: str, prediction: Prediction, assessment: Assessment,
          decision: Decision | None, cam: str | None, cam_class: str | None) -> None:
    """Record what the page showed, once per image, model, method and class (redrawing records nothing): the first
    prediction of an image with this model gets a prediction record with the decision in the page's words
    (``decision``, None for a refused image), later explanations a short one with the words then shown."""
    logged = ("logged", upload.key, ctx.model_key, cam, cam_class)
    if logged in ctx.store:
        return
    ctx.store[logged] = True
    predictor = ctx.predictor
    done = ("audited", upload.key, ctx.model_key)
    if done in ctx.store:
        _append(ctx, explanation_record(session_id=ctx.session_id, image_sha256=sha,
                                        checkpoint_sha256=predictor.checkpoint_sha256,
                                        cam_method=prediction.cam_method, cam_class=prediction.cam_class,
                                        decision_text=None if decision is None else decision.text))
        return
    ctx.store[done] = True
    _append(ctx, prediction_record(
        session_id=ctx.session_id, image_sha256=sha, image_shape=xray.pixels.shape, image_format=xray.format,
        header=xray.header, arch=predictor.arch, checkpoint_sha256=predictor.checkpoint_sha256,
        classes=predictor.classes, preprocess=predictor.preprocess.to_dict(), temperature=predictor.temperature,
        probabilities=prediction.probs, label=prediction.label, confidence=prediction.confidence,
        cam_method=prediction.cam_method, cam_class=prediction.cam_class,
        warnings=[*assessment.reasons, *assessment.warnings], verdict=assessment.to_dict(),
        site=None if getattr(predictor, "site", None) is None else predictor.site.summary(),
        decision=None if decision is None else decision.to_dict()))


def analyse(upload: Upload, xray: Xray, cam: str | None, cam_class: str | None,
            ctx: Context) -> tuple[Prediction, Assessment, str]:
    """Predict and explain an image once per upload, model, method and class in this session, and judge it (the
    page records it with :func:`audit` once it has made its decision).

    Returns:
        ``(prediction, assessment, SHA-256 of the pixels)``.
    """
    sha_key = ("sha", upload.key)
    if sha_key not in ctx.store:
        ctx.store[sha_key] = pixel_sha256(xray.pixels)
    key = ("prediction", upload.key, ctx.model_key, cam, cam_class)
    if key not in ctx.store:
        prediction = ctx.predictor.predict(xray, cam=cam, cam_class=cam_class, name=upload.name)
        assessment = assess(xray, prediction, getattr(getattr(ctx.predictor, "gate", None), "unavailable", None))
        ctx.store[key] = (prediction, assessment)
    prediction, assessment = ctx.store[key]
    return prediction, assessment, ctx.store[sha_key]


def prune(store: MutableMapping[Any, Any], uploads: list[Upload], model_key: str) -> None:
    """Forget cached images and predictions of removed files, and predictions of another model."""
    live = {u.key for u in uploads}
    # keys are (kind, upload key, ...); prediction keys are ("prediction", upload key, model key, method, class)
    by_model = ("prediction", "audited", "logged", "display-heat")
    stale = [k for k in store if k[1] not in live or (k[0] in by_model and k[2] != model_key)]
    for key in stale:
        del store[key]
