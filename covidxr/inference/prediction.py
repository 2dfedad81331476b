"""What the predictor returns for one image: its class probabilities, the explanation and the input gate's verdict
(:class:`Prediction`; :class:`covidxr.inference.predictor.Predictor` makes them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidxr.model.gate import GateVerdict


@dataclass
class Prediction:
    """The model's output for one image.

    Attributes:
        name: the image's name (file name, or what the caller passed).
        probs: class -> probability (temperature-calibrated when the checkpoint has a temperature).
        label: predicted class.
        confidence: ``probs[label]``.
        heatmap: ``(H, W)`` float32 in ``[0, 1]`` on the original image geometry; None without a CAM or when no
            explanation is available (see ``note``).
        cam_method: the CAM method used, or None.
        cam_class: the class explained, or None.
        note: why there is no heatmap although one was asked for, e.g. ``"no explanation available (constant
            heatmap)"``; None otherwise.
        gate: the input gate's verdict; a refused image is "not assessed: REASON", and its probabilities are the
            model's output on an input it was not made for.
        lung_share: share of the heatmap's mass inside the lungs, when the checkpoint crops to the lungs (its lung
            model gives the mask); None otherwise.
        logits: the network's raw logits of the film (before the temperature), class order; what the evaluation's
            metrics read when it takes them from this pass.
    """

    name: str
    probs: dict[str, float]
    label: str
    confidence: float
    heatmap: np.ndarray | None = None
    cam_method: str | None = None
    cam_class: str | None = None
    note: str | None = None
    gate: GateVerdict | None = None
    lung_share: float | None = None
    logits: tuple[float, ...] | None = None

    @property
    def assessable(self) -> bool:
        """False when the input gate refused the image."""
        return self.gate is None or self.gate.assessable

    def to_dict(self) -> dict:
        """Return a JSON-friendly dict of everything but the heatmap."""
        out = {"name": self.name, "label": self.label, "confidence": float(self.confidence),
               "probs": {k: float(v) for k, v in self.probs.items()}, "cam_method": self.cam_method,
               "cam_class": self.cam_class, "note": self.note,
               "gate": None if self.gate is None else self.gate.to_dict()}
        return out if self.lung_share is None else {**out, "lung_share": self.lung_share}
