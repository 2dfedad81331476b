"""A source adversary for training (``--adversary W``): a small head learns to tell each training image's source
(hospital, collection) from the classifier's pooled features and its true class, while the backbone is trained so
that this adversary can say no more about the source than the class alone tells (the class-conditional source
frequencies of the training split). The features then stop carrying which hospital a film of a given class came
from: domain confusion (Tzeng et al. 2015) conditioned on the class, rather than DANN's gradient reversal (Ganin et
al. 2016), whose reversed gradient vanishes once the adversary is confident, as it soon is on X-ray sources.

Only the training network carries it: checkpoints for prediction keep the classifier alone; ``last.pt`` also keeps
the adversary so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from covidxr.errors import DatasetError
from covidxr.networks.architectures import XrayClassifier

HIDDEN = 256


class SourceAdversary(nn.Module):
    """A two-layer network from (pooled features, one-hot class) to source logits.

    ``prior`` is (num_classes, num_sources): each class's source frequencies in the training split, the most the
    features should let anyone know about the source.
    """

    def __init__(self, num_features: int, prior: torch.Tensor, hidden: int = HIDDEN) -> None:
        super().__init__()
        num_classes, num_sources = prior.shape
        self.num_classes = num_classes
        self.register_buffer("prior", prior.float())
        self.hidden = nn.Linear(num_features + num_classes, hidden)
        self.out = nn.Linear(hidden, num_sources)

    def logits(self, features: torch.Tensor, targets: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Source logits, (B, num_sources); ``frozen`` passes gradients to ``features`` only, not to the weights."""
        x = torch.cat([features, F.one_hot(targets, self.num_classes).to(features.dtype)], 1)
        layers = [(m.weight.detach(), m.bias.detach()) if frozen else (m.weight, m.bias)
                  for m in (self.hidden, self.out)]
        return F.linear(F.relu(F.linear(x, *layers[0])), *layers[1])

    def forward(self, features: torch.Tensor, targets: torch.Tensor,
                sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the adversary's loss (source cross-entropy on features it cannot change) and the confusion loss
        for the backbone (cross-entropy of the fixed adversary's output against the class's source frequencies)."""
        own = self.logits(features.detach(), targets)
        adversary_loss = F.cross_entropy(own.float(), sources)
        seen = self.logits(features, targets, frozen=True).float().log_softmax(1)
        confusion = -(self.prior[targets] * seen).sum(1).mean()
        return adversary_loss, confusion


class AdversarialNetwork(nn.Module):
    """The classifier and its source adversary as one module, so DDP and ``torch.compile`` see both."""

    def __init__(self, model: XrayClassifier, adversary: SourceAdversary, weight: float) -> None:
        super().__init__()
        self.model = model
        self.adversary = adversary
        self.weight = weight

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the class logits and the source losses to add to the class loss (the adversary's own loss plus
        ``weight`` times the backbone's confusion loss)."""
        features = self.model.features(images)
        adversary_loss, confusion = self.adversary(features, targets, sources)
        return self.model.head(features), adversary_loss + self.weight * confusion


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


def source_prior(targets: torch.Tensor, sources: torch.Tensor, num_classes: int, num_sources: int) -> torch.Tensor:
    """Each class's source frequencies, (num_classes, num_sources); a class without images gets uniform ones."""
    counts = torch.zeros(num_classes, num_sources)
    counts.index_put_((targets, sources), torch.ones(len(targets)), accumulate=True)
    counts[counts.sum(1) == 0] = 1.0
    return counts / counts.sum(1, keepdim=True)


def build_adversarial(model: XrayClassifier, train: pd.DataFrame, classes: list[str],
                      weight: float) -> tuple[AdversarialNetwork, torch.Tensor]:
    """The training network with a new source adversary, and the source index of every training row."""
    names, sources = source_indices(train)
    targets = torch.tensor([classes.index(c) for c in train["label"]], dtype=torch.long)
    prior = source_prior(targets, sources, len(classes), len(names))
    return AdversarialNetwork(model, SourceAdversary(model.head.in_features, prior), weight), sources
