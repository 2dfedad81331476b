"""A source adversary for training (``--adversary W``): a small head that tries to tell each training image's
source (hospital, collection) from the classifier's pooled features, given its true class, trained through a
gradient reversal layer, so the backbone is pushed towards features that do not say which hospital a film of a
given class came from (DANN, Ganin et al. 2016, conditioned on the class as in CDAN, Long et al. 2018).

Only the training network carries it: checkpoints for prediction keep the classifier alone; ``last.pt`` also
keeps the adversary so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from covidxr.errors import DatasetError
from covidxr.models import XrayClassifier

HIDDEN = 256


class _GradReverse(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad.neg() * ctx.scale, None


def grad_reverse(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` unchanged; gradients flowing back through it are reversed and scaled by ``scale``."""
    return _GradReverse.apply(x, scale)


class SourceAdversary(nn.Module):
    """Predict the source from (reversed) pooled features and the one-hot true class."""

    def __init__(self, num_features: int, num_classes: int, num_sources: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(num_features + num_classes, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_sources))

    def forward(self, features: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        """Return source logits, (B, num_sources); the backbone receives ``-scale`` times their gradient."""
        onehot = F.one_hot(targets, self.num_classes).to(features.dtype)
        return self.net(torch.cat([grad_reverse(features, scale), onehot], 1))


class AdversarialNetwork(nn.Module):
    """The classifier and its source adversary as one module, so DDP and ``torch.compile`` see both."""

    def __init__(self, model: XrayClassifier, adversary: SourceAdversary, weight: float) -> None:
        super().__init__()
        self.model = model
        self.adversary = adversary
        self.weight = weight

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the class logits and the adversary's source cross-entropy."""
        features = self.model.features(images)
        source_logits = self.adversary(features, targets, self.weight)
        return self.model.head(features), F.cross_entropy(source_logits.float(), sources)


def source_indices(train: pd.DataFrame) -> tuple[list[str], torch.Tensor]:
    """The training split's sources (sorted) and each training row's index into them.

    Raises:
        DatasetError: the training split has no ``source`` column or a single source (nothing to be invariant to).
    """
    if "source" not in train.columns:
        raise DatasetError("--adversary needs a source per image: the manifest has no source column")
    sources = train["source"].fillna("").astype(str)
    names = sorted(set(sources))
    if len(names) < 2:
        raise DatasetError(f"--adversary needs at least two sources in the training split, found {names}")
    index = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([index[s] for s in sources], dtype=torch.long)


def build_adversarial(model: XrayClassifier, train: pd.DataFrame,
                      weight: float) -> tuple[AdversarialNetwork, torch.Tensor]:
    """The training network with a new source adversary, and the source index of every training row."""
    names, sources = source_indices(train)
    adversary = SourceAdversary(model.head.in_features, model.num_classes, len(names))
    return AdversarialNetwork(model, adversary, weight), sources
