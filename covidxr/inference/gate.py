"""The input gate: is this an assessable frontal chest radiograph? Asked before the classifier's output is shown.

Checks, in order; each failed check gives a reason, and any reason refuses the image ("not assessed: REASON"):

1. File checks (no model): a colour image (:attr:`~covidxr.io.Xray.color`: a photograph, a tinted picture), an image
   under :data:`TINY_SIDE` pixels a side, and for DICOM the header's modality (not plain radiography), body part
   (not the chest) and view position (lateral or oblique).
2. View (learned by :mod:`covidxr.inference.gate_fit`): a multinomial logistic regression on the classifier's own
   pooled backbone features, fitted on the training split's upright frontal films against the same films rotated
   by 90, 180 and 270 degrees and inverted (1 - x), and real lateral films. Refused when P(frontal) is below
   ``min_frontal``.
3. Out of distribution (learned): the cosine distance of the features to their nearest training films; refused
   above a high (split-conformal) quantile of the validation split's distances.

The fitted gate travels in the checkpoint as ``ckpt["gate"]`` (:meth:`InputGate.to_dict`): tensors, floats, strings
and lists only, so ``torch.load(weights_only=True)`` reads it. It is tied to the model weights by their digest: the
features of other weights mean something else. Without a gate (older checkpoints) only the file checks run and the
gate's ``unavailable`` says why the learned checks did not run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from covidxr.errors import CheckpointError
from covidxr.io import Xray
from covidxr.utils import softmax

GATE_FORMAT = "covidxr-gate"
GATE_VERSION = 1
FRONTAL = "frontal"
VIEW_CLASSES = (FRONTAL, "rotated", "inverted", "lateral")
TINY_SIDE = 128  # refused below this: the network input is upscaled from a thumbnail
SMALL_SIDE = 256  # a warning below this: fine detail is missing
RADIOGRAPHY = frozenset({"CR", "DX", "DR", "RG"})
CHEST_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "CHESTWALL"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "L", "R", "LEFT LATERAL", "RIGHT LATERAL"})
OBLIQUE_VIEWS = frozenset({"RAO", "LAO", "RPO", "LPO", "RLO", "LLO", "OBL", "OBLIQUE"})
VIEW_REASONS = {"rotated": "looks rotated, not an upright film", "inverted": "looks inverted (a negative: bone dark)",
                "lateral": "looks like a lateral view, not a frontal one"}
NO_GATE = ("the checkpoint has no fitted gate, so only the file checks ran (view and out-of-distribution checks "
           "unavailable; add them with python -m covidxr.gate fit)")


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer for one image.

    Attributes:
        assessable: False when any check refused the image.
        reasons: why it was refused, most basic check first (empty when assessable).
        checks: the failed checks, one code per reason: ``colour``, ``size``, ``dicom``, the likely view
            (``rotated``, ``inverted``, ``lateral``) or ``ood``.
        warnings: caveats that do not refuse (a small image).
        view_probs: view class -> probability, or None without the view check.
        ood_distance: the image's distance from the training films, or None without the check.
        ood_threshold: the distance above which images are refused, or None.
        learned: whether the learned checks ran (when not, :attr:`InputGate.unavailable` says why).
    """

    assessable: bool
    reasons: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    view_probs: dict[str, float] | None = None
    ood_distance: float | None = None
    ood_threshold: float | None = None
    learned: bool = False

    @property
    def reason(self) -> str:
        """All reasons on one line ("" when assessable)."""
        return "; ".join(self.reasons)

    @property
    def status(self) -> str:
        """``"assessed"`` or ``"not assessed"``."""
        return "assessed" if self.assessable else "not assessed"

    def headline(self) -> str:
        """``"not assessed: REASON"`` for a refused image, else ``"assessed"``."""
        return "assessed" if self.assessable else f"not assessed: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {"assessable": self.assessable, "reason": self.reason, "reasons": list(self.reasons),
                "checks": list(self.checks), "warnings": list(self.warnings), "view_probs": self.view_probs,
                "ood_distance": self.ood_distance, "ood_threshold": self.ood_threshold, "learned": self.learned}


def file_checks(xray: Xray) -> tuple[list[tuple[str, str]], list[str]]:
    """The checks that need no model: colour, size and the DICOM header.

    Returns:
        ``([(check code, reason to refuse)], warnings)``, in plain language without file names (they may go into the
        audit log).
    """
    reasons, warnings = [], []
    if xray.color:
        reasons.append(("colour", "a colour image (a photograph or a tinted picture?), not a plain radiograph"))
    height, width = xray.pixels.shape[:2]
    if min(height, width) < TINY_SIDE:
        reasons.append(("size", f"too small ({width} x {height} px; at least {TINY_SIDE} px a side needed)"))
    elif min(height, width) < SMALL_SIDE:
        warnings.append(f"a small image ({width} x {height} px): fine detail is missing and the result is less "
                        "reliable")
    header = xray.header or {}
    modality = str(header.get("Modality", "")).strip().upper()
    if modality and modality not in RADIOGRAPHY:
        reasons.append(("dicom", f"the DICOM modality is {modality}, not a plain radiograph (CR/DX)"))
    part = str(header.get("BodyPartExamined", "")).strip().upper()
    if part and part not in CHEST_PARTS:
        reasons.append(("dicom", f"the DICOM body part is {part}, not the chest"))
    view = str(header.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        reasons.append(("dicom", f"the DICOM view position is {view}: a lateral view, not a frontal one (PA/AP)"))
    elif view in OBLIQUE_VIEWS:
        reasons.append(("dicom", f"the DICOM view position is {view}: an oblique view, not a frontal one (PA/AP)"))
    return reasons, warnings


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes: which weights a gate was fitted for."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _array(value: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(value.float().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if array.ndim != ndim or not np.isfinite(array).all():
        raise CheckpointError(f"gate: {name} must be a finite {ndim}-d array, got shape {array.shape}")
    return array


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(array), dtype=torch.float32)


def _features(features: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    """``(B, F)`` float64 features checked against the gate's feature size."""
    array = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features,
                       dtype=np.float64)
    array = array.reshape(1, -1) if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"the gate expects (B, {dim}) backbone features, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class ViewModel:
    """Multinomial logistic regression on standardised backbone features: view class probabilities.

    Attributes:
        classes: view classes, :data:`FRONTAL` among them.
        mean: ``(F,)`` feature mean of the fitting set.
        scale: ``(F,)`` feature standard deviation of the fitting set.
        coef: ``(K, F)`` weights on the standardised features.
        intercept: ``(K,)`` biases.
        min_frontal: images with P(frontal) below this are refused.
    """

    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    min_frontal: float = 0.5

    def probs(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B, K)`` view probabilities of ``(B, F)`` backbone features."""
        z = (_features(features, len(self.mean)) - self.mean) / self.scale
        return softmax(z @ self.coef.T + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "mean": _tensor(self.mean), "scale": _tensor(self.scale),
                "coef": _tensor(self.coef), "intercept": _tensor(self.intercept),
                "min_frontal": float(self.min_frontal)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewModel:
        classes = tuple(str(c) for c in d["classes"])
        model = cls(classes, _array(d["mean"], "view.mean", 1), _array(d["scale"], "view.scale", 1),
                    _array(d["coef"], "view.coef", 2), _array(d["intercept"], "view.intercept", 1),
                    float(d.get("min_frontal", 0.5)))
        k, f = len(classes), len(model.mean)
        if FRONTAL not in classes or model.coef.shape != (k, f) or model.intercept.shape != (k,) or \
                model.scale.shape != (f,) or (model.scale <= 0).any():
            raise CheckpointError(f"gate: inconsistent view model (classes {list(classes)}, coef {model.coef.shape})")
        return model


@dataclass(frozen=True)
class OodModel:
    """How far features lie from the training films: one minus the mean cosine similarity to the ``k`` most similar
    training films. The features are not centred: their overall direction is what sets CT slices and photographs
    apart from radiographs (a Mahalanobis distance after PCA whitening missed most CT slices, see the README).

    Attributes:
        reference: ``(N, F)`` unit-length backbone features of (up to a cap of) the training split's films.
        k: neighbours averaged.
        threshold: distances above this are refused.
        alpha: the share of validation films allowed above the threshold (a split-conformal quantile).
    """

    reference: np.ndarray
    k: int
    threshold: float
    alpha: float

    def distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B,)`` distances in ``[0, 2]`` of ``(B, F)`` backbone features."""
        x = _features(features, self.reference.shape[1])
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        similarity = x @ self.reference.T
        k = min(self.k, similarity.shape[1])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k:].mean(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "knn-cosine", "reference": torch.tensor(self.reference, dtype=torch.float16), "k": self.k,
                "threshold": float(self.threshold), "alpha": float(self.alpha)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OodModel:
        if d.get("kind") != "knn-cosine":
            raise CheckpointError(f"gate: unknown out-of-distribution check {d.get('kind')!r}")
        model = cls(_array(d["reference"], "ood.reference", 2), int(d["k"]), float(d["threshold"]),
                    float(d["alpha"]))
        if len(model.reference) == 0 or model.k < 1 or not np.isfinite(model.threshold):
            raise CheckpointError(f"gate: inconsistent out-of-distribution check ({len(model.reference)} reference "
                                  f"films, k {model.k}, threshold {model.threshold})")
        return model


@dataclass
class InputGate:
    """The gate of one checkpoint: the file checks always, the learned checks when fitted (see the module docstring).

    Attributes:
        view: the view check, or None.
        ood: the out-of-distribution check, or None.
        weights_sha256: digest of the model weights the learned checks were fitted on.
        info: how the gate was fitted (counts, the lateral films used, validation rates), plain values only.
        unavailable: why the learned checks do not run (None when they do).
    """

    view: ViewModel | None = None
    ood: OodModel | None = None
    weights_sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = NO_GATE

    @property
    def learned(self) -> bool:
        """Whether the learned checks run."""
        return self.unavailable is None and (self.view is not None or self.ood is not None)

    def check(self, xray: Xray, features: np.ndarray | torch.Tensor | None = None) -> GateVerdict:
        """The verdict on one image.

        Args:
            xray: the decoded image (file checks).
            features: its ``(F,)`` or ``(1, F)`` pooled backbone features (learned checks); None runs the file checks
                only (with a warning when the gate has learned checks).

        Returns:
            The verdict.
        """
        return self.check_batch([xray], None if features is None else _as_batch(features))[0]

    def check_batch(self, xrays: list[Xray], features: np.ndarray | torch.Tensor | None = None) -> list[GateVerdict]:
        """The verdicts on several images; ``features`` is ``(B, F)`` in the same order, or None."""
        learned = self.learned_checks(features) if self.learned and features is not None else None
        verdicts = []
        for i, xray in enumerate(xrays):
            reasons, warnings = file_checks(xray)
            if self.learned and features is None:
                warnings.append("no backbone features given: the learned checks did not run")
            probs, distance, more = learned[i] if learned is not None else (None, None, [])
            reasons += more
            verdicts.append(GateVerdict(not reasons, tuple(r for _, r in reasons), tuple(c for c, _ in reasons),
                                        tuple(warnings), probs, distance,
                                        None if self.ood is None or learned is None else float(self.ood.threshold),
                                        learned is not None))
        return verdicts

    def learned_checks(self, features: np.ndarray | torch.Tensor) -> list[tuple[dict[str, float] | None,
                                                                                  float | None, list[tuple[str, str]]]]:
        """The learned checks alone on ``(B, F)`` backbone features.

        Returns:
            Per image: ``(view probabilities or None, distance or None, [(check code, reason to refuse)])``.
        """
        view_probs = self.view.probs(features) if self.view is not None else None
        distances = self.ood.distance(features) if self.ood is not None else None
        out = []
        for i in range(len(view_probs if view_probs is not None else distances)):
            reasons = []
            probs = None
            if view_probs is not None:
                probs = dict(zip(self.view.classes, map(float, view_probs[i]), strict=True))
                if probs[FRONTAL] < self.view.min_frontal:
                    likely = max((c for c in probs if c != FRONTAL), key=probs.get)
                    reasons.append((likely, f"{VIEW_REASONS.get(likely, f'looks {likely}')} "
                                            f"(P(frontal) = {probs[FRONTAL]:.2f})"))
            distance = None if distances is None else float(distances[i])
            if distance is not None and distance > self.ood.threshold:
                reasons.append(("ood", f"unlike the films the model was trained on (feature distance {distance:.3f} > "
                                       f"{self.ood.threshold:.3f})"))
            out.append((probs, distance, reasons))
        return out

    def refused(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B,)`` bool: which of ``(B, F)`` backbone features the learned checks refuse (for measuring)."""
        return np.array([bool(reasons) for _, _, reasons in self.learned_checks(features)], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint entry ``ckpt["gate"]``: tensors, floats, strings and lists only."""
        if not (self.view or self.ood):
            raise ValueError("an unfitted gate has nothing to store")
        return {"format": GATE_FORMAT, "version": GATE_VERSION, "weights_sha256": self.weights_sha256,
                "view": self.view.to_dict() if self.view else None, "ood": self.ood.to_dict() if self.ood else None,
                "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], weights: str | None = None) -> InputGate:
        """Rebuild a gate from :meth:`to_dict` output.

        Args:
            d: the stored gate.
            weights: the digest of the weights it will be used with (:func:`weights_sha256`); when it differs from the
                fitted one the learned checks are switched off, with the reason in ``unavailable``.

        Raises:
            CheckpointError: not a gate, a newer format, or inconsistent arrays.
        """
        if not isinstance(d, Mapping) or d.get("format") != GATE_FORMAT:
            raise CheckpointError("gate: not a covidxr gate")
        if int(d.get("version", 0)) > GATE_VERSION:
            raise CheckpointError(f"gate: format version {d.get('version')} is newer than this covidxr reads "
                                  f"({GATE_VERSION})")
        view = ViewModel.from_dict(d["view"]) if d.get("view") else None
        ood = OodModel.from_dict(d["ood"]) if d.get("ood") else None
        if view is not None and ood is not None and len(view.mean) != ood.reference.shape[1]:
            raise CheckpointError(f"gate: view ({len(view.mean)}) and ood ({ood.reference.shape[1]}) feature sizes "
                                  "differ")
        fitted = str(d.get("weights_sha256", ""))
        unavailable = None
        if weights is not None and fitted != weights:
            unavailable = ("the gate was fitted for other model weights, so only the file checks ran (refit it with "
                           "python -m covidxr.gate fit)")
        return cls(view, ood, fitted, dict(d.get("info") or {}), unavailable)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], source: str = "checkpoint") -> InputGate:
        """The gate of a loaded checkpoint (file checks only when it has none).

        Raises:
            CheckpointError: a stored gate that cannot be read (the message names ``source``).
        """
        stored = ckpt.get("gate")
        if stored is None:
            return cls()
        try:
            return cls.from_dict(stored, weights_sha256(ckpt["model"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: gate: unreadable ({type(exc).__name__}: {exc})") from exc
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc


def _as_batch(features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return features.reshape(1, -1) if features.ndim == 1 else features
