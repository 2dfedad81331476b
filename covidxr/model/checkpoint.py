"""Self-describing checkpoints: atomic saving, safe loading (``weights_only=True``) and validation."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from covidxr.errors import CheckpointError
from covidxr.files import atomic_write_bytes

FORMAT = "covidxr-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "arch", "classes", "preprocess", "model")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Serialise ``checkpoint`` with ``torch.save`` and write it atomically.

    Raises:
        CheckpointError: the file could not be written (full disk, no permission); any previous file at
            ``path`` is left intact.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CheckpointError(f"{path}: could not save checkpoint ({exc.strerror or exc}); previous file kept") from exc


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a covidxr checkpoint safely (no code runs) and check that it is one.

    Raises:
        CheckpointError: missing, truncated, unsafe (needs arbitrary code to unpickle) or not a covidxr checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file needs code execution to load (not a plain weights file); "
            "only checkpoints written by covidxr can be opened"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a covidxr checkpoint (a plain state dict? pass it as --weights instead)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt
