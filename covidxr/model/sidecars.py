"""Everything fitted to a model after training lives beside its checkpoint, in sidecars pinned to the checkpoint's
SHA-256; the checkpoint itself is never rewritten once training has saved it.

* ``best.calibration.json`` (:mod:`covidxr.model.calibration_file`): the temperature, the thresholds and a summary of
the
  evaluation that fitted them.
* ``best.gate.pt`` (this module): the input gate (:mod:`covidxr.model.gate`), written by ``python -m covidxr.gate
  fit`` and at the end of training. Before issue #28 the gate was written *into* ``best.pt``, which changed its hash
  and orphaned a calibration sidecar fitted before it; a gate stored inside an older checkpoint is still read, by
  :func:`read_gate` only (a sidecar, when present and pinned to these bytes, wins).

Why sidecars rather than everything inside: a checkpoint is what training produced and what a hash names in the report,
the audit log, the ONNX metadata and the DICOM SR. Anything learned later must not change that name, and a sidecar
that names another hash is refused (with a warning), never silently applied to other weights.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from covidxr.errors import CheckpointError
from covidxr.files import atomic_write_bytes, file_digest
from covidxr.model.gate import InputGate

log = logging.getLogger("covidxr.model")

GATE_FILE_FORMAT = "covidxr-gate-file"
GATE_SUFFIX = ".gate.pt"


def gate_path(checkpoint: str | os.PathLike) -> Path:
    """The gate sidecar of ``checkpoint``: ``best.pt`` -> ``best.gate.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + GATE_SUFFIX)


def write_gate(checkpoint: str | os.PathLike, gate: InputGate, sha256: str | None = None) -> Path:
    """Write ``gate`` beside ``checkpoint``, pinned to its SHA-256, atomically; return the sidecar's path.

    Raises:
        CheckpointError: the checkpoint's bytes do not hash to ``sha256`` (it changed while the gate was fitted).
    """
    checkpoint = Path(checkpoint)
    digest = file_digest(checkpoint)
    if sha256 is not None and digest != sha256:
        raise CheckpointError(f"{checkpoint}: changed while its gate was fitted; gate not written (fit it again)")
    buffer = io.BytesIO()
    torch.save({"format": GATE_FILE_FORMAT, "checkpoint": checkpoint.name, "checkpoint_sha256": digest,
                "gate": gate.to_dict()}, buffer)
    path = gate_path(checkpoint)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_gate(checkpoint: str | os.PathLike, sha256: str, inside: Mapping[str, Any] | None, weights: str,
              source: str = "checkpoint") -> InputGate:
    """The gate of a checkpoint: its sidecar when pinned to these bytes (``sha256``), else the gate an older
    checkpoint carried inside (``inside``), else the file checks only.

    ``weights`` is :func:`covidxr.model.gate.weights_sha256` of the weights the gate will read features of.

    Raises:
        CheckpointError: a stored gate that cannot be read.
    """
    path = gate_path(checkpoint)
    if path.is_file():
        stored = _sidecar(path, sha256)
        if stored is not None:
            return _gate(stored, weights, str(path))
    if inside is not None:
        return _gate(inside, weights, source)
    return InputGate()


def _sidecar(path: Path, sha256: str) -> Mapping[str, Any] | None:
    """The gate entry of a sidecar made for these checkpoint bytes; None (with a warning) for any other."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        log.warning("%s: unreadable gate file (%s); only the file checks run", path, exc)
        return None
    record = pinned(record, path, GATE_FILE_FORMAT, sha256, "gate file", "fit the gate again (python -m covidxr.gate "
                    "fit)")
    return None if record is None else record.get("gate")


def pinned(record: Any, path: Path, fmt: str, sha256: str, kind: str, remedy: str) -> dict[str, Any] | None:
    """``record`` (a sidecar's content) when it is a ``fmt`` record pinned to these checkpoint bytes (``sha256``);
    None with a warning naming ``kind`` and the ``remedy`` otherwise. Every sidecar is checked here."""
    if not isinstance(record, dict) or record.get("format") != fmt:
        log.warning("%s: not a covidxr %s; ignored", path, kind)
        return None
    if record.get("checkpoint_sha256") != sha256:
        log.warning("%s: made for other checkpoint bytes (SHA-256 %s..., this file %s...); ignored: %s", path,
                    str(record.get("checkpoint_sha256"))[:8], sha256[:8], remedy)
        return None
    return record


def _gate(stored: Any, weights: str, source: str) -> InputGate:
    try:
        return InputGate.from_dict(stored, weights)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: gate: unreadable ({type(exc).__name__}: {exc})") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
