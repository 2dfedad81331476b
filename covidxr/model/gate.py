"""The input gate: is this an assessable frontal chest radiograph? Asked before the classifier's output is shown.

Checks, in order; each failed check gives a reason in plain words, and any reason refuses the image ("not assessed:
REASON"). The first reason is the most likely one (:attr:`GateVerdict.reason`, what the page shows):

1. File checks (no model, :mod:`covidxr.model.gate_files`): a colour image (:attr:`~covidxr.images.reader.Xray.color`: a
   photograph, a tinted picture), an image under 128 pixels a side, and for DICOM the header's modality (not plain
   radiography), body part (not the chest) and view position (lateral or oblique).
2. View (learned by :mod:`covidxr.inference.gate_fit`): a multinomial logistic regression on the classifier's own
   pooled backbone features, fitted on the training split's upright frontal films against the same films rotated
   by 90, 180 and 270 degrees and inverted (1 - x), real lateral films and CT slices, and photographs and documents
   made by :mod:`covidxr.inference.gate_kinds`. Refused when P(frontal) is below ``min_frontal``; the reason names
   the most likely other kind ("This looks like a CT slice, not a chest X-ray").
3. Out of distribution (learned): the cosine distance of the features to their nearest training films. Up to a high
   (split-conformal) quantile of the validation split's distances a film passes; in the band above it, up to
   :attr:`OodModel.outer`, it is *borderline* ("unusual film: read with care": assessed, output shown and marked);
   beyond the band it is refused.

The fitted gate is stored beside the checkpoint, ``best.gate.pt`` pinned to its SHA-256 (:mod:`covidxr.model.sidecars`;
older checkpoints carry it inside as ``ckpt["gate"]``), as :meth:`InputGate.to_dict`: tensors, floats, strings
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
from covidxr.images.reader import Xray
from covidxr.model.gate_files import file_checks
from covidxr.utils import softmax

GATE_FORMAT = "covidxr-gate"
GATE_VERSION = 2  # 2: more view kinds (ct, photo, document) and the borderline band
FRONTAL = "frontal"
VIEW_CLASSES = (FRONTAL, "rotated", "inverted", "lateral", "ct", "photo", "document")
BORDERLINE = "unusual film: read with care"
VIEW_REASONS = {
    "rotated": "This film looks rotated: upload it upright (head at the top)",
    "inverted": ("This film looks inverted (bones dark, like a negative). If it looks normal on your viewing station, "
                 "the export lost or mislabelled its grey-scale setting (MONOCHROME1): export it again as shown on "
                 "screen, or ask your PACS team"),
    "lateral": "This looks like a side (lateral) view: the model reads only frontal chest X-rays",
    "ct": "This looks like a CT slice, not a chest X-ray",
    "photo": "This looks like a photograph, not a chest X-ray",
    "document": "This looks like a document or a screenshot, not a chest X-ray",
}
OOD_REASON = "This image is too unlike the chest X-rays the model learned from to be read"
BORDERLINE_WARNING = ("Unusual film: it differs more than most from the films the model learned from (another "
                      "hospital or scanner?), so read its output with care")
NO_GATE = ("the checkpoint has no fitted gate, so only the file checks ran (view and out-of-distribution checks "
           "unavailable; add them with python -m covidxr.gate fit)")


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer for one image.

    Attributes:
        assessable: False when any check refused the image.
        reasons: why it was refused, in plain words, the most likely first (empty when assessable).
        checks: the failed checks, one code per reason: ``colour``, ``size``, ``dicom``, the likely kind
            (``rotated``, ``inverted``, ``lateral``, ``ct``, ``photo``, ``document``) or ``ood``.
        warnings: caveats that do not refuse (a small image, a borderline film).
        view_probs: view class -> probability, or None without the view check.
        ood_distance: the image's distance from the training films, or None without the check.
        ood_threshold: the distance above which images are refused, or None.
        learned: whether the learned checks ran (when not, :attr:`InputGate.unavailable` says why).
        borderline: assessed, but its distance lies in the band between the threshold and the refusal
            (:data:`BORDERLINE`).
        ood_outer: the distance above which images are refused (the band's outer edge), or None.
    """

    assessable: bool
    reasons: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    view_probs: dict[str, float] | None = None
    ood_distance: float | None = None
    ood_threshold: float | None = None
    learned: bool = False
    borderline: bool = False
    ood_outer: float | None = None

    @property
    def reason(self) -> str:
        """The most likely reason ("" when assessable); :attr:`reasons` has them all."""
        return self.reasons[0] if self.reasons else ""

    @property
    def status(self) -> str:
        """``"assessed"``, ``"borderline"`` (assessed, read with care) or ``"not assessed"``."""
        return "not assessed" if not self.assessable else "borderline" if self.borderline else "assessed"

    def headline(self) -> str:
        """``"not assessed: REASON"`` for a refused image, :data:`BORDERLINE` for a borderline one, else
        ``"assessed"``."""
        return f"not assessed: {self.reason}" if not self.assessable else BORDERLINE if self.borderline else "assessed"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {"assessable": self.assessable, "reason": self.reason, "reasons": list(self.reasons),
                "checks": list(self.checks), "warnings": list(self.warnings), "view_probs": self.view_probs,
                "ood_distance": self.ood_distance, "ood_threshold": self.ood_threshold, "learned": self.learned,
                "borderline": self.borderline, "ood_outer": self.ood_outer}


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
    apart from radiographs (a Mahalanobis distance after PCA whitening missed most CT slices, see docs/gate.md).

    Attributes:
        reference: ``(N, F)`` unit-length backbone features of (up to a cap of) the training split's films.
        k: neighbours averaged.
        threshold: distances above this are borderline (up to ``outer``) or refused (beyond).
        alpha: the share of validation films allowed above the threshold (a split-conformal quantile).
        outer: distances above this are refused; between ``threshold`` and ``outer`` a film is borderline.
            None (a gate from before the band): ``threshold``.
    """

    reference: np.ndarray
    k: int
    threshold: float
    alpha: float
    outer: float | None = None

    @property
    def refuse_above(self) -> float:
        """The distance above which images are refused."""
        return self.threshold if self.outer is None else max(self.outer, self.threshold)

    def distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B,)`` distances in ``[0, 2]`` of ``(B, F)`` backbone features."""
        x = _features(features, self.reference.shape[1])
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        similarity = x @ self.reference.T
        k = min(self.k, similarity.shape[1])
        return 1.0 - np.partition(similarity, -k, axis=1)[:, -k:].mean(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "knn-cosine", "reference": torch.tensor(self.reference, dtype=torch.float16), "k": self.k,
                "threshold": float(self.threshold), "alpha": float(self.alpha), "outer": float(self.refuse_above)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OodModel:
        if d.get("kind") != "knn-cosine":
            raise CheckpointError(f"gate: unknown out-of-distribution check {d.get('kind')!r}")
        model = cls(_array(d["reference"], "ood.reference", 2), int(d["k"]), float(d["threshold"]),
                    float(d["alpha"]), None if d.get("outer") is None else float(d["outer"]))
        if len(model.reference) == 0 or model.k < 1 or not np.isfinite([model.threshold, model.refuse_above]).all():
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
            ood = self.ood if learned is not None else None
            borderline = not reasons and ood is not None and distance is not None and distance > ood.threshold
            if borderline:
                warnings.append(BORDERLINE_WARNING)
            verdicts.append(GateVerdict(not reasons, tuple(r for _, r in reasons), tuple(c for c, _ in reasons),
                                        tuple(warnings), probs, distance,
                                        None if ood is None else float(ood.threshold), learned is not None,
                                        borderline, None if ood is None else float(ood.refuse_above)))
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
                    reasons.append((likely, VIEW_REASONS.get(likely, f"This looks like {likely}, not a chest X-ray")))
            distance = None if distances is None else float(distances[i])
            if distance is not None and distance > self.ood.refuse_above and not reasons:
                reasons.append(("ood", OOD_REASON))
            out.append((probs, distance, reasons))
        return out

    def refused(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B,)`` bool: which of ``(B, F)`` backbone features the learned checks refuse (for measuring)."""
        return np.array([bool(reasons) for _, _, reasons in self.learned_checks(features)], dtype=bool)

    def borderline(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B,)`` bool: which of ``(B, F)`` backbone features pass but land in the borderline band."""
        return np.array([not reasons and self.ood is not None and d is not None and d > self.ood.threshold
                         for _, d, reasons in self.learned_checks(features)], dtype=bool)

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


def _as_batch(features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return features.reshape(1, -1) if features.ndim == 1 else features
