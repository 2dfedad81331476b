"""The source-contrast objective (``--loss contrast``): each film's class is learned only against the classes its own
source holds, so no class can be learned as "the look of a collection".

Public COVID chest X-ray collections are confounded: a collection that holds one class only (COVID films from one
hospital, normals from another) teaches a softmax classifier to answer with the collection's look. Here every
training film's softmax is restricted to the classes of its source (the set of labels that source has in the
training split): a ``siim`` film is scored COVID against normal, an NIH film pneumonia against normal, a compilation
that holds all three against all three, and a source with a single class teaches nothing (its films get no weight
and are not drawn). At prediction time the network's full softmax over every class is used as before: the pairwise
contrasts learned inside each collection meet in one set of logits. torchxrayvision's masking of the labels a
dataset lacks is the same idea for one-vs-rest outputs.

The same rule chooses the best epoch: :func:`within_source_auc` scores validation films only against the classes of
their own source, so a source's look cannot raise the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

LOSSES = ("softmax", "contrast")


def source_classes(table: pd.DataFrame) -> dict[str, frozenset[str]]:
    """Each source's set of labels in ``table`` (a run's training split)."""
    return {str(s): frozenset(g["label"]) for s, g in table.groupby(table["source"].astype(str), sort=True)}


def contrast_mask(table: pd.DataFrame, classes: Sequence[str],
                  sets: dict[str, frozenset[str]] | None = None) -> np.ndarray:
    """``(len(table), len(classes))`` booleans: the classes each row's loss compares it against.

    A row's classes are its source's labels (from ``sets``, default the labels of ``table`` itself); a row whose
    source holds fewer than two classes, or whose source ``sets`` does not know, compares against nothing (all False).
    """
    sets = source_classes(table) if sets is None else sets
    index = {c: i for i, c in enumerate(classes)}
    mask = np.zeros((len(table), len(classes)), dtype=bool)
    for row, source in enumerate(table["source"].astype(str)):
        allowed = sets.get(source, frozenset())
        if len(allowed) >= 2:
            mask[row, [index[c] for c in allowed if c in index]] = True
    return mask


class SourceContrastLoss(nn.Module):
    """Cross-entropy over the classes of each film's own source (rows of a mask fixed for the training split).

    Called as ``loss(logits, targets, rows)`` with ``rows`` the films' positions in the training split; films with
    no contrast (a single-class source) add nothing, and a batch of only such films gives a zero loss that still
    has a gradient path (so optimisers and gradient scalers see an ordinary step).
    """

    needs_rows = True

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.bool), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        allowed = self.mask[rows].to(logits.device)
        logits = logits.float().masked_fill(~allowed, float("-inf"))
        keep = allowed.any(1)
        if not keep.any():
            return logits.new_zeros(()) + 0.0 * torch.nan_to_num(logits, neginf=0.0).sum()
        picked = torch.log_softmax(logits[keep], dim=1).gather(1, targets[keep].unsqueeze(1))
        return -picked.mean()


def contrast_criterion(train: pd.DataFrame, classes: Sequence[str]) -> SourceContrastLoss:
    """The loss of a run's training split (rows in split order)."""
    return SourceContrastLoss(contrast_mask(train, classes))


def within_source_auc(probs: np.ndarray, targets: np.ndarray, sources: Sequence[str]) -> float:
    """Mean over sources holding two or more classes of the macro one-vs-rest ROC-AUC among that source's classes.

    Probabilities are renormalised over the source's classes first, so only the contrasts that exist inside one
    collection are scored (threshold-free). NaN when no source holds two classes.
    """
    sources = np.asarray([str(s) for s in sources])
    scores = []
    for source in sorted(set(sources)):
        rows = sources == source
        present = sorted(set(targets[rows].tolist()))
        if len(present) < 2:
            continue
        sub = probs[np.ix_(rows, present)]
        sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
        y = targets[rows]
        aucs = [roc_auc_score(y == c, sub[:, i]) for i, c in enumerate(present)]
        scores.append(float(np.mean(aucs)) if len(present) > 2 else float(aucs[0]))
    return float(np.mean(scores)) if scores else float("nan")
