"""The estimates of a site profile, from a model and a site's unlabelled films: batch-norm statistics mixed with the
training ones, class priors by EM (Saerens, Latinne & Decaestecker 2002), and the collapse guard.

Settings (:class:`AdaptSettings`) were fixed before any film was scored, from the literature, or chosen on choice sets
that share no film with any scored set (the guard's call-growth bound and leaving the priors unapplied; docs/adapt.md
"What ships"), never tuned on an evaluated set: the batch-norm mix follows Schneider et al. (2020, "Improving
robustness against common corruptions by covariate shift adaptation"): ``weight = n / (n + N)`` with ``N`` the
training statistics' strength in films, here scaled down linearly with depth (earlier layers adapt most, the last
hardly at all: later layers carry the class mix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from covidxr.utils import softmax


@dataclass(frozen=True)
class AdaptSettings:
    """What the adaptation may do.

    Attributes:
        prior_strength: ``N``: the training statistics count as this many films in the batch-norm mix.
        depth: share of the network's batch-norm layers (in order) whose weight is above 0; the weight falls
            linearly from ``n / (n + N)`` at the first layer to 0 at this depth.
        prior_floor: no class's estimated prior goes below this.
        max_class_share: refuse the profile when the adapted model calls more than this share of the films one class.
        max_prior_shift: refuse it when the estimated priors differ from the training ones by more than this total
            variation distance (half the L1 distance).
        max_call_growth: refuse it when the adapted model calls some class on a share of the site's films larger
            than the unadapted model's share for that class by more than this (chosen on held-out and training
            sources, see docs/adapt.md "Collapse guard").
        min_films: fewer films accepted by the gate than this is an error.
        batch_size: films per forward pass.
        shift_priors: also move the decision with the estimated priors (the head's bias gains their log-ratio).
            Off by default: chosen on the training sources' own test split and the held-out ``siim`` patients,
            where the prior part cost the rarest class most of its recall (docs/adapt.md "What ships"). The
            priors are estimated, recorded and guarded either way.
    """

    prior_strength: float = 32.0
    depth: float = 1.0
    prior_floor: float = 0.02
    max_class_share: float = 0.9
    max_prior_shift: float = 0.5
    max_call_growth: float = 0.21
    min_films: int = 20
    batch_size: int = 16
    shift_priors: bool = False

    def to_dict(self) -> dict:
        """The settings as a plain dict (for ``site.json``)."""
        return asdict(self)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's batch-norm layers that keep running statistics, in definition order (names as in its state
    dict)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def mix_weights(n_layers: int, n_films: int, settings: AdaptSettings) -> list[float]:
    """The site's weight in each batch-norm layer's statistics, first layer first."""
    top = n_films / (n_films + settings.prior_strength)
    reach = max(settings.depth * n_layers, 1e-9)
    return [top * max(0.0, 1.0 - i / reach) for i in range(n_layers)]


@contextlib.contextmanager
def _collecting(layers: list[tuple[str, nn.Module]], weights: list[float],
                totals: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """While open, each batch-norm layer adds its input's per-channel count, sum and sum of squares to ``totals``
    (float64; each batch's mean and variance in float32)
    and normalises the batch with the training statistics mixed with the batch's (so later layers see inputs
    close to the adapted model's)."""
    train = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}

    def hook(name: str, weight: float):
        def pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            var, mean = torch.var_mean(x.float(), dim=[d for d in range(x.dim()) if d != 1], correction=0)
            mean, var = mean.double(), var.double()
            count = x.numel() / x.shape[1]
            acc = totals.setdefault(name, [torch.zeros((), dtype=torch.float64), torch.zeros_like(mean),
                                           torch.zeros_like(var)])
            acc[0] += count
            acc[1] += count * mean
            acc[2] += count * (var + mean * mean)
            mean0, var0 = train[name]
            module.running_mean.copy_(((1 - weight) * mean0.double() + weight * mean).to(mean0.dtype))
            module.running_var.copy_(((1 - weight) * var0.double() + weight * var).to(var0.dtype))
        return pre

    handles = [m.register_forward_pre_hook(hook(name, w)) for (name, m), w in zip(layers, weights, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, m in layers:
            m.running_mean.copy_(train[name][0])
            m.running_var.copy_(train[name][1])


def mixed_bn_stats(model: nn.Module, inputs: torch.Tensor, settings: AdaptSettings,
                   device: torch.device) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """The mixed running statistics of every batch-norm layer for the site's films.

    Each layer's site mean and variance are over all pixels of all films (exact totals, independent of the
    batching); the layers before it normalise with the training statistics mixed with each batch's during the pass.
    The model is left as it was.

    Args:
        model: the classifier in eval mode.
        inputs: ``(N, 1, S, S)`` network inputs of the accepted films, in a fixed order.
        settings: the mix's settings.
        device: where the network runs.

    Returns:
        ``({layer: {"mean", "var"}}, weights per layer)``.
    """
    layers = bn_layers(model)
    weights = mix_weights(len(layers), len(inputs), settings)
    totals: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(), _collecting(layers, weights, totals):
        for start in range(0, len(inputs), settings.batch_size):
            model(inputs[start:start + settings.batch_size].to(device))
    stats = {}
    for (name, m), weight in zip(layers, weights, strict=True):
        count, s, s2 = totals[name]
        mean = s / count
        var = (s2 / count - mean * mean).clamp_min(0) * count / (count - 1).clamp_min(1)  # unbiased, as torch keeps it
        stats[name] = {"mean": (1 - weight) * m.running_mean.double().cpu() + weight * mean.cpu(),
                       "var": (1 - weight) * m.running_var.double().cpu() + weight * var.cpu()}
    return stats, weights


def em_priors(probs: np.ndarray, source: np.ndarray, tol: float = 1e-8,
              max_iter: int = 10_000) -> tuple[np.ndarray, int]:
    """The site's class priors by EM on calibrated posteriors (Saerens, Latinne & Decaestecker 2002).

    Args:
        probs: ``(N, C)`` posteriors under the source priors.
        source: ``(C,)`` the priors the posteriors assume.
        tol: stop when no prior moves by more than this.
        max_iter: at most this many iterations.

    Returns:
        ``(priors (C,), iterations)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    priors = source.copy()
    for it in range(1, max_iter + 1):
        weighted = probs * (priors / source)
        weighted /= weighted.sum(axis=1, keepdims=True)
        new = weighted.mean(axis=0)
        if np.abs(new - priors).max() < tol:
            return new, it
        priors = new
    return priors, max_iter


def floored(priors: np.ndarray, floor: float) -> np.ndarray:
    """``priors`` squeezed so that each is at least ``floor``: ``floor + (1 - C * floor) * priors``."""
    priors = np.asarray(priors, dtype=np.float64)
    return floor + (1.0 - len(priors) * floor) * priors / priors.sum()


def shifted_probs(logits: np.ndarray, temperature: float, offsets: np.ndarray) -> np.ndarray:
    """Calibrated probabilities with the priors' log-ratio added to the scaled logits."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature + offsets)


def collapse_reason(calls: np.ndarray, n_classes: int, site: np.ndarray, source: np.ndarray, classes: list[str],
                    settings: AdaptSettings, unadapted: np.ndarray | None = None) -> str | None:
    """Why the profile must be refused (the adapted model's calls on the site's films collapse onto one class, or
    onto a class the unadapted model seldom called there, or the priors moved too far), or None; ``unadapted`` are
    the unadapted model's calls on the same films (None skips that check)."""
    counts = np.bincount(calls, minlength=n_classes)
    top = int(counts.argmax())
    share = counts[top] / max(len(calls), 1)
    if share > settings.max_class_share:
        return (f"the adapted model calls {share:.0%} of the films {classes[top]} (more than "
                f"{settings.max_class_share:.0%})")
    if unadapted is not None and len(unadapted) == len(calls):
        growth = (counts - np.bincount(unadapted, minlength=n_classes)) / max(len(calls), 1)
        grown = int(growth.argmax())
        if growth[grown] > settings.max_call_growth:
            before = float(np.mean(np.asarray(unadapted) == grown))
            return (f"the adapted model calls {counts[grown] / max(len(calls), 1):.0%} of the films {classes[grown]}, "
                    f"the unadapted model {before:.0%} (a rise of more than {settings.max_call_growth:.0%} of the "
                    f"films)")
    shift = 0.5 * float(np.abs(site - source).sum())
    if shift > settings.max_prior_shift:
        return (f"the estimated class priors differ from the training ones by {shift:.2f} (total variation; "
                f"more than {settings.max_prior_shift:.2f})")
    return None


def source_priors(classes: Sequence[str], config: Mapping[str, Any], split: Mapping[str, Any] | None) -> np.ndarray:
    """The class priors the model's posteriors assume: uniform when training balanced the classes (``--balance``
    loss, sampler or group, in the run's ``config``), else the class frequencies of the training rows of its ``split``
    (uniform when unknown)."""
    classes = list(classes)
    uniform = np.full(len(classes), 1.0 / len(classes))
    if config.get("balance", "loss") != "none":
        return uniform
    split = split or {}
    labels = [label for label, part in zip(split.get("label", []), split.get("split", []), strict=False)
              if part == "train"]
    counts = np.array([labels.count(c) for c in classes], dtype=np.float64)
    return counts / counts.sum() if counts.all() else uniform
