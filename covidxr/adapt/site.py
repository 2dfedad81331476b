"""Adapt a checkpoint to one site from its own unlabelled films and write the site profile
(:mod:`covidxr.model.site_profile`); the command line is :mod:`covidxr.adapt.__main__`.

The films are read as files only: any label a folder name or a metadata file carries is never read (folders are
searched as ``predict`` searches them, and the films are put in the order of their pixels' SHA-256, so neither
names nor folders can change the result). Films the input gate refuses take no part; borderline films do.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidxr.adapt.estimate import (
    AdaptSettings,
    collapse_reason,
    em_priors,
    floored,
    mixed_bn_stats,
    shifted_probs,
    source_priors,
)
from covidxr.errors import CovidxrError, ImageReadError
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.__main__ import find_images
from covidxr.inference.prediction_log import pixel_sha256
from covidxr.inference.predictor import Predictor
from covidxr.model.site_profile import (
    FORMAT,
    FORMAT_VERSION,
    GATE_FILE,
    SiteProfile,
    write_gate_reference,
    write_profile,
)
from covidxr.networks.ensemble import ENSEMBLE

log = logging.getLogger("covidxr.adapt")



@dataclass
class SiteFilms:
    """The site's films as the adaptation uses them.

    Attributes:
        inputs: ``(N, 1, S, S)`` network inputs of the films the gate accepted, in the order of their pixel hashes.
        probs: ``(N, C)`` the unadapted model's calibrated probabilities of those films.
        digests: their pixel SHA-256s, in that order.
        n_refused: films the gate refused.
        n_unreadable: files that could not be read as images.
    """

    inputs: torch.Tensor
    probs: np.ndarray
    digests: list[str]
    n_refused: int
    n_unreadable: int


def read_site_films(predictor: Predictor, files: list[Path], batch_size: int) -> SiteFilms:
    """Read ``files`` (identical films once), run them through the input gate in batches as they are read (only the
    small network inputs are kept), and order the accepted films by their pixels' SHA-256."""
    films: dict[str, tuple[bool, torch.Tensor, list[float]]] = {}
    pending: dict[str, Xray] = {}
    unreadable = 0

    def gate(batch: dict[str, Xray]) -> None:
        results = predictor.predict_batch(list(batch.values()), cam=None)
        for (digest, xray), result in zip(batch.items(), results, strict=True):
            x = predictor.pipeline.network_input(xray.pixels, predictor.preprocess.img_size)[0]
            films[digest] = (result.assessable, x, [result.probs[c] for c in predictor.classes])
        batch.clear()

    for file in files:
        try:
            xray = load_xray(file, name="")  # no file name travels further
        except ImageReadError as exc:
            unreadable += 1
            log.warning("skipped: %s", exc)
            continue
        digest = pixel_sha256(xray.pixels)
        if digest not in films:
            pending[digest] = xray
        if len(pending) == batch_size:
            gate(pending)
    if pending:
        gate(pending)
    kept = [d for d in sorted(films) if films[d][0]]
    shape = (0, 1, predictor.preprocess.img_size, predictor.preprocess.img_size)
    inputs = torch.stack([films[d][1] for d in kept]) if kept else torch.zeros(shape)
    probs = np.array([films[d][2] for d in kept]).reshape(len(kept), len(predictor.classes))
    return SiteFilms(inputs, probs, kept, len(films) - len(kept), unreadable)


def gate_features(predictor: Predictor, inputs: torch.Tensor, batch_size: int) -> np.ndarray | None:
    """``(N, F)`` unit-length pooled features of the unadapted model (what the gate's out-of-distribution check
    reads), or None when the checkpoint's gate has no such check."""
    gate = predictor.gate
    if not gate.learned or gate.ood is None or not len(inputs):
        return None
    with torch.inference_mode():
        x = torch.cat([predictor.model.features(inputs[i:i + batch_size].to(predictor.device)).float().cpu()
                       for i in range(0, len(inputs), batch_size)]).numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def adapted_logits(model: torch.nn.Module, inputs: torch.Tensor, stats: dict[str, dict[str, torch.Tensor]],
                   batch_size: int, device: torch.device) -> np.ndarray:
    """``(N, C)`` logits of a copy of ``model`` whose batch-norm layers carry ``stats``."""
    adapted = copy.deepcopy(model)
    modules = dict(adapted.named_modules())
    for name, s in stats.items():
        modules[name].running_mean.copy_(s["mean"].to(modules[name].running_mean.dtype))
        modules[name].running_var.copy_(s["var"].to(modules[name].running_var.dtype))
    with torch.inference_mode():
        return torch.cat([adapted(inputs[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(inputs), batch_size)]).numpy()


def estimate_profile(predictor: Predictor, films: SiteFilms, source: np.ndarray,
                     settings: AdaptSettings) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The profile record (without name, checkpoint and dates) and the mixed statistics of the site's films
    (none for a refused profile); ``source`` are the priors the model's posteriors assume."""
    classes = predictor.classes
    temperature = predictor.temperature
    stats, weights = mixed_bn_stats(predictor.model, films.inputs, settings, predictor.device)
    logits = adapted_logits(predictor.model, films.inputs, stats, settings.batch_size, predictor.device)
    priors, iterations = em_priors(shifted_probs(logits, temperature, np.zeros(len(classes))), source)
    site = floored(priors, settings.prior_floor)
    offsets = np.log(site / source) if settings.shift_priors else np.zeros(len(classes))
    calls = shifted_probs(logits, temperature, offsets).argmax(axis=1)
    unadapted = films.probs.argmax(axis=1)
    reason = collapse_reason(calls, len(classes), site, source, classes, settings, unadapted)
    record = {
        "status": "refused" if reason else "adapted", "reason": reason, "n_films": len(films.digests),
        "n_refused": films.n_refused, "n_unreadable": films.n_unreadable,
        "films_sha256": hashlib.sha256("\n".join(films.digests).encode()).hexdigest(),
        "temperature": temperature, "classes": list(classes), "source_priors": [float(p) for p in source],
        "site_priors": [float(p) for p in site], "em_priors": [float(p) for p in priors], "em_iterations": iterations,
        "logit_offsets": [float(o) for o in offsets],
        "calls_unadapted": {c: int((unadapted == i).sum()) for i, c in enumerate(classes)},
        "calls_adapted": {c: int((calls == i).sum()) for i, c in enumerate(classes)},
        "settings": settings.to_dict(),
        "bn": {"layers": len(weights), "weight_first": weights[0] if weights else None,
               "weight_last": weights[-1] if weights else None},
        "decision": ("the arg-max and the COVID threshold apply to the prior-corrected posterior (softmax of the "
                     "logits / temperature + logit_offsets)" if settings.shift_priors else
                     "the arg-max and the COVID threshold apply to the adapted model's calibrated posterior; the "
                     "estimated priors are recorded, not applied (logit_offsets are 0)"),
    }
    return record, ({} if reason else stats)


def adapt_site(checkpoint: str | os.PathLike, data: str | os.PathLike, name: str, out: str | os.PathLike,
               device: str = "auto", settings: AdaptSettings | None = None) -> SiteProfile:
    """Adapt ``checkpoint`` to the site whose films are under ``data`` and write the profile into ``out``.

    Returns:
        The profile as written (``adapted`` False when the collapse guard refused it: the model runs unadapted).

    Raises:
        CovidxrError: unusable checkpoint, no such folder, too few films accepted by the gate, an ensemble.
    """
    settings = settings or AdaptSettings()
    start = time.perf_counter()
    if not Path(data).is_dir():
        raise CovidxrError(f"--data {data}: not a folder")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, backend="torch")
    if predictor.trained.record.get("arch") == ENSEMBLE:
        raise CovidxrError(f"{checkpoint}: adaptation needs a single model; a seed ensemble is not supported")
    predictor.model.to(memory_format=torch.channels_last)  # about twice as fast on a CPU; the same on CUDA
    files = find_images([data])
    films = read_site_films(predictor, files, settings.batch_size)
    if len(films.digests) < settings.min_films:
        raise CovidxrError(f"{data}: {len(films.digests)} films accepted by the input gate ({films.n_refused} "
                           f"refused, {films.n_unreadable} unreadable); adaptation needs at least {settings.min_films}")
    record, stats = estimate_profile(predictor, films, source_priors(predictor.classes, predictor.trained.config,
                                                                    predictor.trained.record.get("split")), settings)
    reference = gate_features(predictor, films.inputs, settings.batch_size) if not record["reason"] else None
    if reference is not None:
        record["gate_reference"] = write_gate_reference(Path(out), reference)
    else:
        (Path(out) / GATE_FILE).unlink(missing_ok=True)  # an earlier profile's, no longer named
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, **record,
              "checkpoint": Path(checkpoint).name, "checkpoint_sha256": predictor.checkpoint_sha256,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 1)}
    path = write_profile(out, record, stats)
    return SiteProfile({**record, "_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}, stats, path.parent)

