"""Rebuilding a checkpoint's network: the one place a checkpoint dictionary becomes a network
(:func:`model_from_checkpoint`), used by :meth:`covidxr.model.trained.TrainedModel.load` and by training's own resume.
"""

from __future__ import annotations

import torch

from covidxr.errors import CheckpointError, one_line
from covidxr.networks.architectures import Classifier, WeightsError, build_model
from covidxr.networks.ensemble import ENSEMBLE, EnsembleClassifier
from covidxr.preprocessing.transforms import Preprocess


def read_preprocess(ckpt: dict, source: str = "checkpoint") -> Preprocess:
    """Return the checkpoint's preprocessing record, checked.

    Raises:
        CheckpointError: the record is malformed or uses an unknown geometry.
    """
    try:
        pre = Preprocess.from_dict(dict(ckpt["preprocess"]))
        valid = (int(pre.img_size) == pre.img_size >= 8 and len(pre.mean) == 3 and len(pre.std) == 3
                 and all(s > 0 for s in pre.std))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: malformed preprocess record ({exc})") from exc
    if not valid:
        raise CheckpointError(f"{source}: malformed preprocess record {ckpt['preprocess']}")
    if pre.geometry != "letterbox":
        raise CheckpointError(f"{source}: unknown preprocessing geometry {pre.geometry!r} (only 'letterbox')")
    return pre


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> Classifier:
    """Rebuild a checkpoint's model exactly: architecture (or a seed ensemble's members), head, weights (strict)
    and normalisation, on the CPU.

    The normalisation mean/std are not in the state dict; they come from the checkpoint's preprocess record, so a
    model trained from weights with their own statistics (EfficientNet-Lite0, GoogLeNet) is rebuilt as trained.

    Raises:
        CheckpointError: unknown architecture, malformed classes, or weights that do not fit (one line).
    """
    arch, classes = ckpt["arch"], ckpt["classes"]
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise CheckpointError(f"{source}: classes must be at least two distinct names, got {classes!r}")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{source}: the model entry is not a state dict")
    pre = read_preprocess(ckpt, source)
    try:
        model = _untrained(ckpt, len(classes), source)
    except WeightsError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{source}: weights do not fit {arch} with {len(classes)} classes: {one_line(exc)}") \
            from exc
    model.set_normalization(torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1),
                            torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
    return model


def architecture_name(ckpt: dict) -> str:
    """How a checkpoint's network is named to people: its architecture, or "ensemble of 3 efficientnet_lite0"."""
    record = ckpt.get("ensemble")
    if ckpt.get("arch") == ENSEMBLE and isinstance(record, dict):
        return f"ensemble of {record.get('members')} {record.get('arch')}"
    return str(ckpt.get("arch"))


def _untrained(ckpt: dict, num_classes: int, source: str) -> Classifier:
    """The checkpoint's network with random weights: its architecture, or its ensemble record's members."""
    if ckpt["arch"] != ENSEMBLE:
        return build_model(str(ckpt["arch"]), num_classes, "none")
    record = ckpt.get("ensemble")
    count = record.get("members") if isinstance(record, dict) else None
    if not isinstance(count, int) or count < 2 or not isinstance(record.get("arch"), str):
        raise CheckpointError(f"{source}: an ensemble checkpoint needs an ensemble record with the members' "
                              f"architecture and their number (at least 2), got {record!r}")
    return EnsembleClassifier([build_model(record["arch"], num_classes, "none") for _ in range(count)], [1.0] * count)
