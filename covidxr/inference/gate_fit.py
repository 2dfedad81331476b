"""Fit the input gate (:mod:`covidxr.model.gate`) of a trained checkpoint, and ``python -m covidxr.gate``.

    python -m covidxr.gate fit --checkpoint RUN/best.pt [--data PATH] [--laterals FOLDER] [--ct FOLDER] [--seed 0]
        [--neighbours 5] [--alpha 0.01] [--band 1.0] [--made 150] [--device auto] [--batch-size 32] [--out FILE]

The run's own split is reused (``split.csv`` beside the checkpoint, else the checkpoint's record). The view check is
fitted on the training split's films, upright (frontal), rotated by 90, 180 and 270 degrees (rotated) and inverted
(inverted), on the lateral films and CT slices of a seeded half of their patients (lateral, ct), and on ``--made``
photographs and documents made by :mod:`covidxr.inference.gate_kinds` (photo, document). The out-of-distribution check
keeps the training split's upright films as reference; its threshold is a split-conformal quantile of the validation
split's distances (``--alpha``: the share of validation films above it). Above the threshold lies the *borderline*
band, where a film is assessed and marked "unusual film: read with care"; only beyond the band's outer edge is it
refused. The edge is ``threshold + band * (threshold - median)`` of the validation distances (``--band``, default 1:
as far beyond the threshold as the threshold lies beyond the typical film). The validation split's rotated and
inverted copies and the other patients' lateral films and CT slices then measure the gate (``gate.info
["validation"]``). Nothing else is read: an external test set never shapes the gate.

Laterals and CT slices come from ``--laterals FOLDER`` and ``--ct FOLDER`` (default: ``notcxr/lateral`` and
``notcxr/ct`` beside the data or one folder up); a ``metadata.csv`` with ``path`` and ``patient_id`` in that folder
or its parent groups them by patient. Without them the view check does not learn that kind (the DICOM header check
still refuses lateral and CT DICOMs).

The films go through the run's input path (``covidxr.model.input_pipeline``); for a run that crops to the lungs the
rotated and inverted copies are made of the cropped squares, which approximates the crop of a rotated or inverted
upload.
The gate is written beside the checkpoint, ``best.pt`` -> ``best.gate.pt``, pinned to its SHA-256
(:mod:`covidxr.model.sidecars`); the checkpoint itself is not changed, so a calibration fitted before stays valid.
With ``--out FOLDER`` a copy of the checkpoint and its gate go there instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from covidxr.data.loaders import RunData, load_run_data
from covidxr.data.manifest import resolve_data_path
from covidxr.data.run_folder import RunFolder
from covidxr.errors import CovidxrError, DatasetError
from covidxr.files import atomic_write_bytes
from covidxr.inference.gate_data import GateImages, default_kind_folder, gate_images
from covidxr.model.gate import FRONTAL, InputGate, OodModel, ViewModel
from covidxr.model.sidecars import gate_path, write_gate
from covidxr.model.trained import TrainedModel
from covidxr.networks.architectures import XrayClassifier
from covidxr.preprocessing.transforms import eval_transform
from covidxr.utils import (
    OneLineParser,
    add_checkpoint_arg,
    add_device_arg,
    add_out_arg,
    out_file,
    run_cli,
    setup_logging,
)

log = logging.getLogger("covidxr.gate")
ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}
VARIANTS = ("upright", *ROTATIONS, "inverted")


@dataclass
class GateOptions:
    """How a gate is fitted.

    Attributes:
        neighbours: nearest training films averaged by the out-of-distribution check.
        alpha: share of validation films allowed above its threshold.
        band: width of the borderline band above the threshold, in units of (threshold - median validation
            distance).
        made: photographs and documents made for the view check, of each.
        max_reference: most training films it keeps (stored in the checkpoint in float16).
        C: inverse regularisation strength of the view model (on standardised features).
        min_frontal: refuse images whose P(frontal) is below this.
        seed: which half of the lateral patients is fitted on.
        batch_size: images per backbone pass.
        progress: show progress bars.
    """

    neighbours: int = 5
    alpha: float = 0.01
    band: float = 1.0
    made: int = 150
    max_reference: int = 4096
    C: float = 0.05
    min_frontal: float = 0.5
    seed: int = 0
    batch_size: int = 32
    progress: bool = True


def invert_content(squares: torch.Tensor) -> torch.Tensor:
    """The films of ``(B, 1, S, S)`` letterboxed squares inverted (1 - x), their black padding kept black.

    An inverted upload is letterboxed after inversion, so its padding is black; the padding is the band of blank rows
    (or columns) at both ends of one axis.
    """
    out = squares.clone()
    for i, square in enumerate(squares[:, 0]):
        ends = []
        for blank in (square.amax(dim=1) <= 0, square.amax(dim=0) <= 0):  # blank rows, blank columns
            n = len(blank)
            lead = int(blank.int().cumprod(0).sum())
            trail = int(blank.flip(0).int().cumprod(0).sum())
            ends.append((min(lead, trail), lead, n - trail))
        (row_pad, top, bottom), (col_pad, left, right) = ends
        if row_pad == col_pad == 0 or top >= bottom or left >= right:
            out[i] = 1 - square
        elif row_pad >= col_pad:
            out[i, 0, top:bottom] = 1 - square[top:bottom]
        else:
            out[i, 0, :, left:right] = 1 - square[:, left:right]
    return out


def variant(squares: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, 1, S, S)`` squares as :data:`VARIANTS` names them: upright, rotated (counter-clockwise) or inverted."""
    if name == "upright":
        return squares
    if name == "inverted":
        return invert_content(squares)
    return torch.rot90(squares, ROTATIONS[name], dims=(-2, -1))


def backbone_features(model: XrayClassifier, squares: Sequence[np.ndarray], img_size: int, name: str = "upright",
                      batch_size: int = 32, desc: str | None = None, progress: bool = True) -> np.ndarray:
    """``(N, F)`` pooled backbone features of prepared squares, as the predictor sees them (resized, no augmentation).

    Args:
        model: the classifier; run in eval mode, its mode restored afterwards.
        squares: uint8 ``(S', S')`` letterboxed images.
        img_size: the network input side.
        name: the :data:`VARIANTS` entry to apply first.
        batch_size: images per pass.
        desc: progress bar label (default: the variant's name).
        progress: show the bar.
    """
    device = next(model.parameters()).device
    resize = eval_transform(img_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(squares), batch_size), desc=desc or f"gate features ({name})",
                              disable=not progress, dynamic_ncols=True, leave=False):
                batch = torch.from_numpy(np.stack(squares[start:start + batch_size])).unsqueeze(1).float() / 255.0
                inputs = resize(variant(batch, name)).to(device)
                out.append(model.features(inputs).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.head.in_features), dtype=np.float32)


def fit_view(features: dict[str, np.ndarray], C: float, min_frontal: float, seed: int) -> ViewModel:
    """A multinomial logistic regression over view classes, classes weighted equally.

    Args:
        features: view class -> ``(N_c, F)`` features (:data:`~covidxr.model.gate.FRONTAL` among them).
        C: inverse regularisation strength.
        min_frontal: refusal threshold on P(frontal).
        seed: the solver's random state.
    """
    from sklearn.linear_model import LogisticRegression

    classes = [c for c, f in features.items() if len(f)]
    if FRONTAL not in classes or len(classes) < 2:
        raise DatasetError(f"the view check needs frontal films and at least one other view, got {classes}")
    x = np.concatenate([features[c] for c in classes]).astype(np.float64)
    y = np.concatenate([np.full(len(features[c]), i) for i, c in enumerate(classes)])
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit((x - mean) / scale, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(classes) == 2:  # sklearn keeps one row for two classes: the second class's logit against the first's
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    return ViewModel(tuple(classes), mean, scale, coef, intercept, min_frontal)


def fit_ood(train: np.ndarray, val: np.ndarray, k: int = 5, alpha: float = 0.01, max_reference: int = 4096,
            seed: int = 0, band: float = 1.0) -> OodModel:
    """The nearest-films distance with its threshold set on the validation films.

    The threshold is the split-conformal quantile of the validation distances, the ceil((n + 1)(1 - alpha))-th smallest
    of n: a new film from the same distribution passes with probability at least 1 - alpha (for fewer than
    2 / alpha - 1 validation films, the largest validation distance). The band's outer edge lies ``band`` times
    (threshold - median validation distance) above it.

    Args:
        train: ``(N, F)`` features of the training split's upright films, the reference (a seeded random subset of
            ``max_reference`` when there are more).
        val: ``(M, F)`` features of the validation split's upright films (the training films' own distances are
            optimistically small).
        k: neighbours averaged.
        alpha: share of validation films allowed above the threshold, in (0, 1).
        max_reference: most training films kept as reference (the checkpoint stores them, in float16).
        seed: picks the subset.
        band: width of the borderline band (0: none, refused above the threshold).
    """
    if len(train) == 0 or len(val) == 0:
        raise DatasetError(f"the out-of-distribution check needs training and validation films, got {len(train)} "
                           f"and {len(val)}")
    if len(train) > max_reference:
        train = train[np.sort(np.random.default_rng(seed).choice(len(train), max_reference, replace=False))]
    reference = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    # Rounded as stored, so the threshold is measured with the reference the predictor will use.
    reference = reference.astype(np.float16).astype(np.float64)
    distances = np.sort(OodModel(reference, k, np.inf, alpha).distance(val))
    rank = min(len(distances), math.ceil((len(distances) + 1) * (1 - alpha)))
    threshold = float(distances[rank - 1])
    return OodModel(reference, k, threshold, alpha, threshold + band * (threshold - float(np.median(distances))))


def fit_gate(model: XrayClassifier, images: GateImages, img_size: int, opts: GateOptions,
             weights: str) -> InputGate:
    """Fit both learned checks on ``images`` and measure them on the held-out ones (``info["validation"]``).

    Args:
        model: the trained classifier.
        images: the films to fit and measure on.
        img_size: the network input side.
        opts: fitting options.
        weights: :func:`~covidxr.model.gate.weights_sha256` of the model's state dict.
    """
    start = time.perf_counter()

    def feats(squares: list[np.ndarray], name: str, label: str) -> np.ndarray:
        return backbone_features(model, squares, img_size, name, opts.batch_size, f"gate: {label} {name}",
                                 opts.progress)

    train = {name: feats(images.train, name, "train") for name in VARIANTS}
    views = {FRONTAL: train["upright"], "rotated": np.concatenate([train[n] for n in ROTATIONS]),
             "inverted": train["inverted"]}
    views |= {kind: feats(squares, "upright", kind) for kind, squares in images.fit.items() if squares}
    view = fit_view(views, opts.C, opts.min_frontal, opts.seed)
    val = {name: feats(images.val, name, "val") for name in VARIANTS}
    ood = fit_ood(train["upright"], val["upright"], opts.neighbours, opts.alpha, opts.max_reference, opts.seed,
                  opts.band)
    gate = InputGate(view, ood, weights, unavailable=None)
    measured = {"val_upright_passed": float(1 - gate.refused(val["upright"]).mean()),
                "val_upright_borderline": float(gate.borderline(val["upright"]).mean()),
                "val_rotated_refused": float(np.mean([gate.refused(val[n]).mean() for n in ROTATIONS])),
                "val_inverted_refused": float(gate.refused(val["inverted"]).mean())}
    for kind, squares in images.holdout.items():
        if squares:
            measured[f"{kind}_holdout_refused"] = float(gate.refused(feats(squares, "upright", kind)).mean())
    counts = {f"n_{kind}_{role}": len(getattr(images, role).get(kind) or []) for kind in images.fit
              for role in ("fit", "holdout")}
    gate.info = {**images.info, "n_train": len(images.train), "n_val": len(images.val), **counts,
                 "n_reference": len(ood.reference), "neighbours": opts.neighbours, "alpha": opts.alpha, "C": opts.C,
                 "band": opts.band,
                 "seed": opts.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "seconds": round(time.perf_counter() - start, 1), "validation": measured}
    return gate


def fit_checkpoint(checkpoint: str | os.PathLike, opts: GateOptions | None = None, device: str = "auto",
                   data: str | None = None, laterals: str | os.PathLike | None = None, run: RunData | None = None,
                   out: str | os.PathLike | None = None, ct: str | os.PathLike | None = None) -> InputGate:
    """Fit the gate of a checkpoint on its run's split and write it beside the checkpoint (``best.gate.pt``), pinned
    to the checkpoint's SHA-256, atomically; the checkpoint is not changed.

    Args:
        checkpoint: the checkpoint file (``RUN/best.pt``).
        opts: fitting options.
        device: where the backbone runs.
        data: the run's dataset (default: the one it was trained on).
        laterals: folder of lateral films (default: :func:`default_kind_folder`).
        run: the run's data already loaded with its split (training passes its own); None loads it.
        out: write a copy of the checkpoint here, with its gate beside it, instead.
        ct: folder of CT slices (default: :func:`default_kind_folder`).

    Raises:
        CheckpointError: an unusable checkpoint.
        DatasetError: the run's data or split cannot be found, or too few films.
    """
    opts = opts or GateOptions()
    path = Path(checkpoint)
    trained = TrainedModel.load(path, device=device)
    folder = RunFolder.of(trained)
    # The films go through the run's own input path (lung crop and mask, equalisation), with the checkpoint's lung
    # model.
    settings = folder.loader_settings(data)
    if run is None:
        run = load_run_data(settings, folder.require_split())
    data_path = resolve_data_path(settings.data)
    folders = {kind: Path(given) if given is not None else default_kind_folder(data_path, kind)
               for kind, given in (("lateral", laterals), ("ct", ct))}
    images = gate_images(run, settings, folders, opts.seed, opts.made)
    gate = fit_gate(trained.network, images, trained.img_size, opts, trained.weights_sha256)
    target = path
    if out is not None:  # a copy of the checkpoint (the same bytes, so the same hash) with its gate beside it
        target = Path(out)
        atomic_write_bytes(target, path.read_bytes())
    write_gate(target, gate, trained.sha256)
    return gate


# ------------------------------------------------------------------------------------------------------ CLI


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.gate``."""
    parser = OneLineParser(prog="python -m covidxr.gate", description="The input gate: is an image an assessable "
                           "frontal chest radiograph? Fit its learned checks for a trained checkpoint.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    fit = commands.add_parser("fit", help="fit the gate on the run's own split and write it beside the checkpoint")
    add_checkpoint_arg(fit, "the run's checkpoint (best.pt)")
    fit.add_argument("--data", help="the run's dataset (default: the one it was trained on)")
    fit.add_argument("--laterals", type=Path, help="folder of lateral chest films (default: notcxr/lateral beside "
                     "the data or one folder up)")
    fit.add_argument("--ct", type=Path, help="folder of CT slices (default: notcxr/ct beside the data or one "
                     "folder up)")
    fit.add_argument("--band", type=float, default=GateOptions.band,
                     help="width of the borderline band above the threshold, in units of (threshold - median "
                          "validation distance); 0: none (default: %(default)s)")
    fit.add_argument("--made", type=int, default=GateOptions.made,
                     help="photographs and documents made for the view check, of each (default: %(default)s)")
    fit.add_argument("--neighbours", type=int, default=GateOptions.neighbours,
                     help="nearest training films the out-of-distribution check averages (default: %(default)s)")
    fit.add_argument("--alpha", type=float, default=GateOptions.alpha,
                     help="share of validation films allowed above its threshold (default: %(default)s)")
    fit.add_argument("--C", type=float, default=GateOptions.C, dest="C",
                     help="inverse regularisation of the view model (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="picks the lateral patients fitted on (default: 0)")
    add_device_arg(fit)
    fit.add_argument("--batch-size", type=int, default=32, help="images per pass (default: %(default)s)")
    add_out_arg(fit, "write a copy of the checkpoint and its gate into this folder (same file names) instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    parser = get_args_parser()
    return run_cli(parser, lambda args: _fit(parser, args), argv, (CovidxrError, OSError))


def _fit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (0 < args.alpha < 1) or args.neighbours < 1 or args.C <= 0 or args.batch_size < 1 or args.band < 0 \
            or args.made < 0:
        parser.error("--alpha must be in (0, 1), --neighbours, --C and --batch-size positive, --band and --made not "
                     "negative")
    setup_logging()
    opts = GateOptions(args.neighbours, args.alpha, args.band, args.made, C=args.C, seed=args.seed,
                       batch_size=args.batch_size)
    out = out_file(args.out, args.checkpoint.name, parser.prog) if args.out else None
    gate = fit_checkpoint(args.checkpoint, opts, args.device, args.data, args.laterals, out=out, ct=args.ct)
    rates = ", ".join(f"{k} {v:.1%}" for k, v in gate.info["validation"].items())
    log.info("gate fitted (%d train, %d val films, %d + %d laterals, %d + %d CT slices) in %.0fs and stored in %s; %s",
             gate.info["n_train"], gate.info["n_val"], gate.info.get("n_lateral_fit", 0),
             gate.info.get("n_lateral_holdout", 0), gate.info.get("n_ct_fit", 0), gate.info.get("n_ct_holdout", 0),
             gate.info["seconds"], gate_path(out or args.checkpoint), rates)


if __name__ == "__main__":
    sys.exit(main())
