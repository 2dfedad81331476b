"""A seed ensemble as one network: members of one architecture whose calibrated probabilities are averaged.

:class:`EnsembleClassifier` has the interface of :class:`~covidxr.networks.architectures.XrayClassifier` that inference
uses (``features``, ``head``, ``forward``, ``mean``/``std``, ``num_classes``), so the predictor, the input gate,
Grad-CAM,
ONNX export and evaluation take an ensemble checkpoint as they take a single model:

- ``features(x)`` is the members' pooled features side by side, ``(B, sum of F_i)``; the gate is fitted on them.
- ``head`` (:class:`EnsembleHead`) splits them again, applies each member's own linear head and temperature, and
  returns ``log(mean_i softmax(logits_i / T_i))``: a softmax of the output is the members' mean calibrated
  probability, so a further temperature (evaluate's, fitted on the ensemble) applies on top as for any model.
- Grad-CAM explains every member's last convolutional stage (:func:`covidxr.networks.architectures.target_layers`);
  pytorch-grad-cam averages the per-layer maps.

This module knows nothing of checkpoints; :func:`covidxr.networks.architectures.model_from_checkpoint` builds the
members.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ENSEMBLE = "ensemble"


class EnsembleHead(nn.Module):
    """The members' linear heads over their concatenated features, averaged as calibrated probabilities."""

    def __init__(self, heads: Sequence[nn.Linear], temperatures: Sequence[float]) -> None:
        super().__init__()
        if len(heads) != len(temperatures) or len(heads) < 2:
            raise ValueError(f"an ensemble needs at least two heads, one temperature each (got {len(heads)} heads, "
                             f"{len(temperatures)} temperatures)")
        if len({h.out_features for h in heads}) != 1:
            raise ValueError("the members' heads predict different numbers of classes")
        self.heads = nn.ModuleList(heads)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures], dtype=torch.float32))

    @property
    def in_features(self) -> int:
        return sum(h.in_features for h in self.heads)

    @property
    def out_features(self) -> int:
        return self.heads[0].out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, sum F_i)`` features -> ``(B, C)`` log mean calibrated probabilities."""
        parts = features.split([h.in_features for h in self.heads], dim=1)
        log_probs = torch.stack([F.log_softmax(head(part).float() / t, dim=1)
                                 for head, part, t in zip(self.heads, parts, self.temperatures, strict=True)])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.heads))


class EnsembleClassifier(nn.Module):
    """Members (``XrayClassifier``s of one architecture and normalisation) behind one :class:`EnsembleHead`.

    The members' own heads move into the ensemble head (each member keeps an identity in their place), so every
    weight is stored once in the state dict.
    """

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]) -> None:
        super().__init__()
        archs = {m.arch for m in members}
        if len(archs) != 1:
            raise ValueError(f"ensemble members must share one architecture, got {sorted(archs)}")
        self.arch = ENSEMBLE
        heads = []
        for member in members:
            heads.append(member.head)
            member.head = nn.Identity()
        self.members = nn.ModuleList(members)
        self.head = EnsembleHead(heads, temperatures)
        first = members[0]
        self.register_buffer("mean", first.mean.clone(), persistent=False)
        self.register_buffer("std", first.std.clone(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) as the members' pretrained weights expect."""
        return self.members[0].normalize(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' pooled backbone features side by side, ``(B, sum F_i)``."""
        return torch.cat([member.features(x) for member in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, C)`` log mean calibrated probabilities (logits for a softmax)."""
        return self.head(self.features(x))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use ``mean``/``std`` (``(1, 3, 1, 1)``) in every member, as the checkpoint's preprocess record says."""
        for module in (self, *self.members):
            module.mean.copy_(mean)
            module.std.copy_(std)
