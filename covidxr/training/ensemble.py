"""Seed ensembles: runs of one recipe on one patient split, combined into one checkpoint.

    python -m covidxr.train ... --seed 0 --out runs/s0
    python -m covidxr.train ... --seed 1 --split-from runs/s0 --out runs/s1
    python -m covidxr.evaluate --checkpoint runs/s0/best.pt   # each member's temperature (its calibration sidecar)
    python -m covidxr.evaluate --checkpoint runs/s1/best.pt
    python -m covidxr.ensemble runs/s0 runs/s1 --out runs/ens
    python -m covidxr.evaluate --checkpoint runs/ens/best.pt

The ensemble (:class:`~covidxr.networks.ensemble.EnsembleClassifier`) averages the members' calibrated probabilities:
each member's logits are divided by its own temperature (from its calibration sidecar when that belongs to its
checkpoint, else the checkpoint's, else 1). The members must agree on everything but their weights: architecture,
classes, preprocessing and input pipeline (lung crop and mask, equalisation, the lung model) and the patient split,
so that the ensemble's test films are test films of every member. ``best.pt``, ``split.csv`` and ``config.json``
go to ``--out``, which then is a run folder that evaluate, predict, explain and the app open as any other; the input
gate is fitted on the ensemble's features unless ``--no-gate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidxr.data.run_folder import SPLIT_FILE, RunFolder
from covidxr.errors import CheckpointError
from covidxr.files import atomic_write_text
from covidxr.inference.gate_fit import fit_checkpoint
from covidxr.model.calibration import Origin
from covidxr.model.checkpoint import save_checkpoint
from covidxr.model.gate import weights_sha256
from covidxr.model.trained import TrainedModel
from covidxr.networks.ensemble import ENSEMBLE, EnsembleClassifier
from covidxr.utils import OneLineParser, add_device_arg, add_out_arg, library_versions, run_cli, setup_logging

log = logging.getLogger("covidxr.ensemble")

# What every member must share, besides the split: the name in the error and how to read it from a checkpoint.
SHARED = {"architecture": lambda r: r["arch"], "classes": lambda r: list(r["classes"]),
          "preprocessing and input pipeline": lambda r: r["preprocess"],
          "lung model": lambda r: weights_sha256(r["lung_model"]["model"])
          if isinstance(r.get("lung_model"), dict) else None}


def member_checkpoint(given: str | Path) -> Path:
    """The checkpoint a member argument names: a run folder (its ``best.pt``) or the file itself."""
    path = Path(given)
    return path / "best.pt" if path.is_dir() else path


def split_of(member: RunFolder) -> dict[str, str]:
    """A member's patient split, ``relpath -> split``, as its checkpoint records it.

    Raises:
        CheckpointError: the checkpoint records no split.
    """
    split = member.ckpt.get("split")
    if not (isinstance(split, dict) and {"relpath", "split"} <= set(split)):
        raise CheckpointError(f"{member.checkpoint}: the checkpoint records no split, so its test films cannot be told "
                              "apart")
    return dict(zip(map(str, split["relpath"]), map(str, split["split"]), strict=True))


def check_members(members: Sequence[RunFolder]) -> None:
    """Refuse members that differ in anything but their weights (see the module docstring), from their training
    records, before any network is built.

    Raises:
        CheckpointError: fewer than two members, an ensemble among them, or a difference (named, one line).
    """
    if len(members) < 2:
        raise CheckpointError(f"an ensemble needs at least two members, got {len(members)}")
    for member in members:
        if member.ckpt["arch"] == ENSEMBLE:
            raise CheckpointError(f"{member.checkpoint}: already an ensemble; give its members instead")
    first = members[0]
    for what, read in SHARED.items():
        for member in members[1:]:
            if read(member.ckpt) != read(first.ckpt):
                raise CheckpointError(f"{member.checkpoint}: its {what} differs from {first.checkpoint}'s; the "
                                      "members of an ensemble must be runs of one recipe")
    split = split_of(first)
    for member in members[1:]:
        if split_of(member) != split:
            raise CheckpointError(f"{member.checkpoint}: trained on another patient split than {first.checkpoint} "
                                  f"(train the members with --split-from {first.checkpoint.parent}), so the ensemble "
                                  "would be tested on films some member learned from")


def combine(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The ensemble checkpoint of the member checkpoints ``paths``.

    Raises:
        CheckpointError: an unreadable checkpoint or members that cannot be combined (:func:`check_members`).
    """
    check_members([RunFolder.read(member_checkpoint(p)) for p in paths])
    loaded = [TrainedModel.load(member_checkpoint(p), device="cpu") for p in paths]
    temperatures = [m.calibration.temperature for m in loaded]
    for member in loaded:
        if member.calibration.origin in (Origin.NONE, Origin.CHECKPOINT):
            log.warning("%s: no calibration of its own (python -m covidxr.evaluate writes one); its probabilities "
                        "enter the ensemble at temperature %.3g", member.path, member.calibration.temperature)
    model = EnsembleClassifier([m.network for m in loaded], temperatures)
    first = loaded[0].record
    members = [{"checkpoint": str(m.path), "sha256": m.sha256, "seed": m.config.get("seed"), "temperature": t,
                "best_auc": m.record.get("best_auc"), "best_epoch": m.record.get("best_epoch")}
               for m, t in zip(loaded, temperatures, strict=True)]
    kept = ("classes", "preprocess", "config", "split", "data", "lung_model")
    return {**{k: first[k] for k in kept if k in first},
            "arch": ENSEMBLE,
            "ensemble": {"arch": first["arch"], "members": len(loaded), "member_runs": members},
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "best_auc": None, "best_epoch": None, "epoch": None,
            "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_ensemble(paths: Sequence[str | Path], out: str | Path, gate: bool = True, device: str = "auto") -> Path:
    """Write the ensemble of ``paths`` as the run folder ``out`` (``best.pt``, ``split.csv``, ``config.json``) and,
    with ``gate``, fit its input gate. Returns the checkpoint's path.

    Raises:
        CheckpointError: members that cannot be combined, or a checkpoint that cannot be written.
        DatasetError: the gate's films cannot be found (the ensemble is written, without a gate).
    """
    ckpt = combine(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "best.pt"
    save_checkpoint(target, ckpt)
    first = member_checkpoint(paths[0]).parent
    if (first / SPLIT_FILE).is_file():
        shutil.copyfile(first / SPLIT_FILE, out / SPLIT_FILE)
    atomic_write_text(out / "config.json", json.dumps({**ckpt.get("config", {}), "out": str(out),
                                                       "ensemble": ckpt["ensemble"]}, indent=2, default=str) + "\n")
    log.info("ensemble of %d %s members: %s", ckpt["ensemble"]["members"], ckpt["ensemble"]["arch"], target)
    if gate:
        fit_checkpoint(target, device=device)
        log.info("input gate fitted on the ensemble's features")
    return target


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m covidxr.ensemble`` options."""
    p = OneLineParser(prog="python -m covidxr.ensemble",
                                description="Combine runs of one recipe on one patient split (train them with "
                                            "--split-from) into one checkpoint that averages their calibrated "
                                            "probabilities.")
    p.add_argument("members", nargs="+", metavar="RUN", help="member run folders (their best.pt) or checkpoints")
    add_out_arg(p, "the ensemble's run folder (best.pt, split.csv, config.json)", Path("runs/ensemble"))
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit the input gate on the ensemble's features, as python -m covidxr.gate fit does")
    add_device_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the ensemble; exit status 0, or 2 with one line for members that cannot be combined."""
    setup_logging()

    def run(args: argparse.Namespace) -> None:
        target = build_ensemble(args.members, args.out, args.gate, args.device)
        print(f"ensemble: {target}")

    return run_cli(get_args_parser(), run, argv)
