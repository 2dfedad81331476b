"""The prediction log: an append-only JSON-lines file, one line per prediction, safe with concurrent writers.

Every image the clinician app predicts is recorded once per model as one JSON object on one line::

    {"schema": 1, "event": "prediction", "time_utc": "2025-01-01T12:00:00.123456Z", "session_id": "9f2c...",
     "image_sha256": "...", "image_shape": [H, W], "image_format": "DICOM", "dicom_header": {...},
     "model": {"arch": ..., "checkpoint_sha256": ..., "classes": [...], "preprocess": {...}, "temperature": ...,
               "site": null or {"name", "status", "profile_sha256", "n_films", "created", "site_priors"}},
     "probabilities": {...}, "label": ..., "confidence": ..., "cam_method": ..., "cam_class": ..., "warnings": [...],
     "verdict": {"assessable": ..., "reasons": [...], ...},
     "decision": {"text": "COVID: no; most likely pneumonia", "covid": false, ...} or null}

``decision`` is the one decision of :mod:`covidxr.inference.decision` as the page states it (``Decision.to_dict()``:
``text`` is the page's headline word for word, with its cautions); null for an image the input gate refused, whose
reasons are in ``verdict``.

Asking for another explanation of the same image (another CAM method or class) is not a new prediction: it adds a
short ``"event": "explanation"`` record (:func:`explanation_record`: time, session, image and checkpoint digests,
method and class) and never another ``"prediction"`` record.

Privacy: the record holds **no** file name (names often contain patient names), no patient name, ID, birth date or
any other DICOM field than :data:`covidxr.images.dicom.DICOM_HEADER_FIELDS` (filtered here again, whatever the caller
passes). The
image is identified only by the SHA-256 of its decoded pixels (``Xray.pixels``: float32, C order), which lets an
auditor check which image a prediction was made on without storing the image. ``session_id`` is random per browser
session (:func:`new_session_id`), not a user identity.

Concurrency: each record is written with a single ``os.write`` on a file descriptor opened with ``O_APPEND``; POSIX
appends each such write at the end of the file as a whole, so lines of concurrent sessions (threads or processes)
do not interleave on a local file system. The file is created with mode 0600.

Location (chosen by the app, see ``app/streamlit_app.py``; the user-facing names keep the word "audit"):
``--audit-log PATH``, else ``$COVIDXR_AUDIT_LOG``, else ``audit.jsonl`` beside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from covidxr.errors import CovidxrError
from covidxr.images.dicom import DICOM_HEADER_FIELDS

__all__ = [
    "ENV_VAR",
    "SCHEMA_VERSION",
    "PredictionLog",
    "PredictionLogError",
    "new_session_id",
    "pixel_sha256",
    "explanation_record",
    "prediction_record",
    "read_records",
    "safe_header",
]

ENV_VAR = "COVIDXR_AUDIT_LOG"
"""Environment variable naming the prediction log file."""

DEFAULT_FILE_NAME = "audit.jsonl"
"""File name of the default log, placed beside the checkpoint."""

SCHEMA_VERSION = 1

class PredictionLogError(CovidxrError):
    """The prediction log could not be written."""


def new_session_id() -> str:
    """A random session identifier (128 bits, hex); it identifies a browser session, never a person."""
    return secrets.token_hex(16)


def pixel_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of decoded pixel data, as float32 in C order (``Xray.pixels`` bytes).

    Args:
        pixels: the decoded image.

    Returns:
        The hex digest.
    """
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32)).hexdigest()  # the buffer itself: no copy


def _utc_now() -> str:
    """The current time in UTC, ISO 8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _finite(value: Any) -> float | None:
    """A JSON-safe float (``None`` for NaN/inf/non-numbers)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """A JSON-safe copy: mappings and sequences recursively, floats finite or None, other objects as strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    return str(value)


def safe_header(header: Mapping[str, Any] | None) -> dict[str, str]:
    """Keep only the non-identifying DICOM fields (:data:`~covidxr.images.dicom.DICOM_HEADER_FIELDS`) of ``header``.

    Args:
        header: e.g. ``Xray.header``.

    Returns:
        The filtered header, values as strings.
    """
    return {key: str(header[key]) for key in DICOM_HEADER_FIELDS if header and key in header}


def prediction_record(
    *,
    session_id: str,
    image_sha256: str,
    image_shape: Iterable[int],
    image_format: str,
    header: Mapping[str, Any] | None,
    arch: str,
    checkpoint_sha256: str,
    classes: Iterable[str],
    preprocess: Mapping[str, Any],
    temperature: float | None,
    probabilities: Mapping[str, float],
    label: str,
    confidence: float,
    cam_method: str | None,
    cam_class: str | None,
    warnings: Iterable[str] = (),
    verdict: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one prediction record (see the module docstring for its fields and privacy rules).

    Args:
        session_id: from :func:`new_session_id`.
        image_sha256: from :func:`pixel_sha256`.
        image_shape: ``(H, W)`` of the decoded image.
        image_format: ``Xray.format``.
        header: ``Xray.header``; filtered to :data:`~covidxr.images.dicom.DICOM_HEADER_FIELDS`.
        arch: model architecture.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        classes: class names in model order.
        preprocess: the preprocessing record (``Preprocess.to_dict()``).
        temperature: calibration temperature applied to the logits.
        probabilities: class -> probability.
        label: predicted class.
        confidence: probability of the predicted class.
        cam_method: explanation method, or None.
        cam_class: the class explained, or None.
        warnings: input warnings shown with the result (they must not contain file names).
        verdict: whether the image was assessed and why not (``{"assessable", "reasons", ...}``, no file names).
        site: the site profile the model ran with (``SiteProfile.summary()``: name, status, profile SHA-256, films,
            date), or None for the unadapted model; recorded as ``model.site``.
        decision: what the page says about the film (``Decision.to_dict()``, its ``text`` the headline), or None
            for a refused image; recorded as ``decision``.

    Returns:
        A JSON-serialisable dict.
    """
    record = {
        "schema": SCHEMA_VERSION,
        "event": "prediction",
        "time_utc": _utc_now(),
        "session_id": str(session_id),
        "image_sha256": str(image_sha256),
        "image_shape": [int(v) for v in image_shape],
        "image_format": str(image_format),
        "dicom_header": safe_header(header),
        "model": {
            "arch": str(arch),
            "checkpoint_sha256": str(checkpoint_sha256),
            "classes": [str(c) for c in classes],
            "preprocess": json.loads(json.dumps(dict(preprocess), default=str)),
            "temperature": _finite(temperature),
            "site": None if site is None else _plain(dict(site)),
        },
        "probabilities": {str(k): _finite(v) for k, v in probabilities.items()},
        "label": str(label),
        "confidence": _finite(confidence),
        "cam_method": cam_method,
        "cam_class": cam_class,
        "warnings": [str(w) for w in warnings],
    }
    if verdict is not None:
        record["verdict"] = _plain(dict(verdict))
    record["decision"] = None if decision is None else _plain(dict(decision))
    return record


def explanation_record(*, session_id: str, image_sha256: str, checkpoint_sha256: str, cam_method: str | None,
                       cam_class: str | None, decision_text: str | None = None) -> dict[str, Any]:
    """Build the record of a further explanation of an image already predicted (no probabilities, no header).

    Args:
        session_id: from :func:`new_session_id`.
        image_sha256: from :func:`pixel_sha256`.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        cam_method: the explanation method, or None (switched off).
        cam_class: the class explained, or None.
        decision_text: the decision's words as the page now shows them (another heat map can add or drop the
            "mostly outside the lungs" caution), or None for a refused image.

    Returns:
        A JSON-serialisable dict with ``"event": "explanation"``.
    """
    return {"schema": SCHEMA_VERSION, "event": "explanation", "time_utc": _utc_now(), "session_id": str(session_id),
            "image_sha256": str(image_sha256), "checkpoint_sha256": str(checkpoint_sha256), "cam_method": cam_method,
            "cam_class": cam_class, "decision_text": decision_text}


@dataclass(frozen=True)
class PredictionLog:
    """An append-only JSON-lines file.

    Attributes:
        path: the log file; its folder is created on the first append.
    """

    path: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike | None, checkpoint: str | os.PathLike | None) -> PredictionLog | None:
        """Pick the log location: ``explicit``, else ``$COVIDXR_AUDIT_LOG``, else ``audit.jsonl`` beside the checkpoint.

        Args:
            explicit: a path given on the command line, or None.
            checkpoint: the checkpoint in use, or None.

        Returns:
            The log, or None when no location can be derived (no checkpoint and nothing configured).
        """
        chosen = explicit or os.environ.get(ENV_VAR) or None
        if chosen:
            return cls(Path(chosen).expanduser())
        if checkpoint:
            return cls(Path(checkpoint).expanduser().resolve().parent / DEFAULT_FILE_NAME)
        return None

    def append(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one JSON line with a single ``os.write`` on an ``O_APPEND`` descriptor.

        Args:
            record: a JSON-serialisable mapping (normally from :func:`prediction_record`).

        Raises:
            PredictionLogError: the record is not serialisable, or the file cannot be opened or fully written.
        """
        try:
            line = (json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise PredictionLogError(f"prediction record is not valid JSON ({exc})") from exc
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise PredictionLogError(f"cannot open audit log {self.path} ({exc.strerror or exc})") from exc
        try:
            written = os.write(fd, line)
        except OSError as exc:
            raise PredictionLogError(f"cannot write audit log {self.path} ({exc.strerror or exc})") from exc
        finally:
            os.close(fd)
        if written != len(line):
            raise PredictionLogError(f"audit log {self.path}: short write ({written} of {len(line)} bytes)")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read every record of a prediction log (for auditors and tests).

    Args:
        path: the log file.

    Returns:
        The records in file order; an absent file gives ``[]``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
