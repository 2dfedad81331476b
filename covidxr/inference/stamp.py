"""When a loaded predictor is out of date: its checkpoint or the calibration sidecar beside it changed.

Evaluating a model never changes ``best.pt``; it writes ``best.calibration.json`` (temperature, COVID threshold,
summary), which the predictor reads at load. A cache of predictors keyed by the checkpoint alone would keep serving
the old operating point after an evaluation, so callers key it by :func:`model_stamp`.
"""

from __future__ import annotations

import os
from pathlib import Path

from covidxr.model.calibration_file import calibration_path


def model_stamp(checkpoint: str | os.PathLike) -> tuple[int, int]:
    """``(checkpoint mtime_ns, sidecar mtime_ns)``, 0 for a file that does not exist."""
    files = (Path(checkpoint), calibration_path(checkpoint))
    return tuple(p.stat().st_mtime_ns if p.is_file() else 0 for p in files)  # type: ignore[return-value]
