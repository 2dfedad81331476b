"""The calibration of a checkpoint, kept beside it and pinned to it: ``best.pt`` -> ``best.calibration.json``.

Evaluating a model never changes the model file. What an evaluation (or an out-of-source calibration) learns about a
checkpoint, the probability temperature, the decision thresholds and a compact summary of the results, goes into
this sidecar, which names the SHA-256 of the checkpoint it belongs to. The predictor, the app, ``explain`` and later
evaluations read it only when that hash is the checkpoint's: a retrained or replaced ``best.pt`` silently loses a
calibration that was never fitted on it (with a warning), and the report and the app name the same file by the
same hash.

Record: ``{"format", "format_version", "checkpoint", "checkpoint_sha256", "temperature", "temperature_how",
"temperature_origin", "evaluation", "created"}``; ``evaluation`` is the summary that
:func:`covidxr.evaluation.outputs.evaluation_summary` makes (metrics, operating points, external headlines),
``temperature_how`` says in words what the temperature was fitted on and ``temperature_origin`` the same as a
:class:`covidxr.model.calibration.Origin` value (absent in older files). The file is read once, by
:meth:`covidxr.model.trained.TrainedModel.load`, into a :class:`~covidxr.model.calibration.Calibration`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from covidxr.errors import CheckpointError
from covidxr.files import atomic_write_text, file_digest
from covidxr.model.sidecars import pinned

FORMAT = "covidxr-calibration"
FORMAT_VERSION = 1
SUFFIX = ".calibration.json"

log = logging.getLogger("covidxr.calibration")


def calibration_path(checkpoint: str | Path) -> Path:
    """The sidecar of ``checkpoint``: the same name with ``.calibration.json`` in place of its suffix."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX)


def write_calibration(checkpoint: str | Path, sha256: str, temperature: float, temperature_how: str,
                      evaluation: dict[str, Any] | None, origin: str | None = None) -> Path:
    """Write the sidecar of ``checkpoint`` (whose bytes hash to ``sha256``) atomically; return its path.

    Raises:
        CheckpointError: The checkpoint's bytes no longer hash to ``sha256`` (it changed while it was evaluated), or
            the temperature is not a positive finite number.
    """
    checkpoint = Path(checkpoint)
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"{checkpoint}: temperature must be a positive number, got {temperature!r}")
    if file_digest(checkpoint) != sha256:
        raise CheckpointError(f"{checkpoint}: changed during the evaluation; calibration not written (evaluate again)")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint": checkpoint.name,
              "checkpoint_sha256": sha256, "temperature": float(temperature), "temperature_how": temperature_how,
              "temperature_origin": origin,
              "evaluation": evaluation, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = calibration_path(checkpoint)
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def read_calibration(checkpoint: str | Path, sha256: str) -> dict[str, Any] | None:
    """The sidecar record of ``checkpoint`` when it belongs to these bytes (``sha256``), else None.

    A missing sidecar is None; an unreadable one, or one pinned to other bytes, is None with a warning.
    """
    path = calibration_path(checkpoint)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable calibration (%s); probabilities uncalibrated", path, exc)
        return None
    return pinned(record, path, FORMAT, sha256, "calibration file", "evaluate the checkpoint again")
