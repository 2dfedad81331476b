"""A site profile: what ``python -m covidxr.adapt`` learned about one hospital from its own unlabelled films, kept
in a folder beside (never inside) the checkpoint and pinned to the checkpoint's SHA-256.

Folder ``FOLDER/`` (default ``RUN/sites/NAME/``)::

    site.json      the record below (written last: a folder without it is no profile)
    bn_stats.pt    the mixed batch-norm running statistics, {layer name: {"mean", "var"}} (torch.save of tensors
                   only, read with weights_only=True; its SHA-256 is in site.json)
    gate_reference.pt  the unit-length gate features of the films the gate accepted (float16 (N, F); its SHA-256
                   in site.json's ``gate_reference``): added to the gate's out-of-distribution reference under the
                   profile (:func:`site_gate`), so the site's ordinary films stop landing in "read with care"

``site.json``: ``{"format", "format_version", "name", "status" ("adapted" or "refused"), "reason", "checkpoint",
"checkpoint_sha256", "created", "n_films", "n_refused", "n_unreadable", "films_sha256", "temperature", "classes",
"source_priors", "site_priors", "logit_offsets", "calls_unadapted", "calls_adapted", "settings", "bn",
"gate_reference", "seconds"}``.

Applying a profile (:func:`apply_profile`) gives the checkpoint's dict with two changes to its weights, so every
place that builds a model from a checkpoint (the predictor, the app, ``evaluate``, the ONNX export) runs the adapted
model with no other code: the batch-norm running statistics are replaced by the mixed ones, and the head's bias
gains ``temperature * log(site prior / source prior)``, so that ``softmax(logits / temperature)`` is the
prior-corrected posterior of Saerens et al. (2002). The decision rules (the arg-max, the COVID threshold) are then
applied to that posterior unchanged: the operating point moves with the priors as Bayes' rule moves it (a profile made
without ``--shift-priors``, the default, has offsets of 0). The input gate keeps reading the unadapted model's
features (its reference was fitted on them), with the site's accepted films added to its reference. A refused profile
(the collapse guard fired) changes nothing: the model runs unadapted and the reason is shown.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidxr.errors import CovidxrError
from covidxr.files import atomic_write_bytes, atomic_write_text, file_digest

FORMAT = "covidxr-site-profile"
FORMAT_VERSION = 1
RECORD = "site.json"
BN_FILE = "bn_stats.pt"
GATE_FILE = "gate_reference.pt"  # the site's accepted films' unit-length gate features, float16 (N, F)
SITES_FOLDER = "sites"  # RUN/sites/NAME/: where adapt writes by default and where the app looks

if TYPE_CHECKING:  # torch is imported where tensors are read or written: the page lists profiles before torch loads
    import torch

    from covidxr.model.gate import InputGate

log = logging.getLogger("covidxr.site")


class SiteProfileError(CovidxrError):
    """An unusable site profile: missing, damaged, or made for another checkpoint."""


@dataclass
class SiteProfile:
    """A site profile's record (``site.json``) and, for an adapted profile, its batch-norm statistics.

    Attributes:
        record: the JSON record (see the module docstring).
        bn_stats: layer name -> ``{"mean", "var"}`` tensors (empty for a refused profile).
        folder: where it was read from (None before it is written).
        gate_reference: ``(N, F)`` the gate features of the site's accepted films (None: a refused profile, a gate
            without an out-of-distribution check, or a profile written before it was stored).
    """

    record: dict[str, Any]
    bn_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    folder: Path | None = None
    gate_reference: np.ndarray | None = None

    @property
    def name(self) -> str:
        """The site's name."""
        return str(self.record["name"])

    @property
    def adapted(self) -> bool:
        """True when the profile changes the model (False: refused by the collapse guard)."""
        return self.record.get("status") == "adapted"

    @property
    def sha256(self) -> str:
        """SHA-256 of ``site.json`` as written (empty before it is written)."""
        return str(self.record.get("_sha256", ""))

    def describe(self) -> str:
        """One line for the page, the caption and the report: ``adapted to NAME from N films on DATE`` (or why the
        profile was refused)."""
        date = str(self.record.get("created", ""))[:10]
        if self.adapted:
            return f"adapted to {self.name} from {self.record['n_films']} films on {date}"
        return f"not adapted to {self.name}: profile refused ({self.record.get('reason')}); the model runs unadapted"

    def summary(self) -> dict[str, Any]:
        """What the audit log, the SR and the export record about the profile (no file names)."""
        return {"name": self.name, "status": self.record.get("status"), "profile_sha256": self.sha256,
                "n_films": self.record.get("n_films"), "created": self.record.get("created"),
                "site_priors": self.record.get("site_priors")}


def profile_record_path(path: str | os.PathLike) -> Path:
    """``site.json`` of a profile given as its folder or as the file itself."""
    path = Path(path)
    return path if path.name == RECORD or path.suffix == ".json" else path / RECORD


def write_profile(folder: str | os.PathLike, record: dict[str, Any],
                  bn_stats: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write a profile atomically: the statistics first, then ``site.json`` (which names their hash); return the
    path of ``site.json``."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    if bn_stats:
        buffer = io.BytesIO()
        torch.save({k: {s: v.detach().cpu().double() for s, v in d.items()} for k, d in bn_stats.items()}, buffer)
        atomic_write_bytes(folder / BN_FILE, buffer.getvalue())
        record["bn"] = {**record.get("bn", {}), "file": BN_FILE, "sha256": file_digest(folder / BN_FILE)}
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, allow_nan=False) + "\n")
    if not bn_stats:
        (folder / BN_FILE).unlink(missing_ok=True)  # an earlier adapted profile's statistics, no longer named
    return folder / RECORD


def read_profile(path: str | os.PathLike, checkpoint_sha256: str) -> SiteProfile:
    """Read the profile at ``path`` (its folder or ``site.json``) for the checkpoint whose bytes hash to
    ``checkpoint_sha256``.

    Raises:
        SiteProfileError: missing or damaged files, or a profile made for another checkpoint (one line).
    """
    file = profile_record_path(path)
    if not file.is_file():
        raise SiteProfileError(f"{path}: no site profile there (expected {file.name}; make one with python -m "
                               "covidxr.adapt)")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiteProfileError(f"{file}: unreadable site profile ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SiteProfileError(f"{file}: not a covidxr site profile")
    if record.get("checkpoint_sha256") != checkpoint_sha256:
        made_for = str(record.get("checkpoint_sha256"))[:12]
        raise SiteProfileError(f"{file}: site profile made for another checkpoint (SHA-256 {made_for}..., this one "
                               f"{checkpoint_sha256[:12]}...); adapt this checkpoint with python -m covidxr.adapt")
    record["_sha256"] = file_digest(file)
    profile = SiteProfile(record, folder=file.parent)
    if profile.adapted:
        profile.bn_stats = _read_bn_stats(file.parent, record)
        if record.get("gate_reference"):
            profile.gate_reference = _gate_reference(file.parent, record["gate_reference"])
            if profile.gate_reference is None:
                raise SiteProfileError(f"{file.parent / GATE_FILE}: missing, or not the gate reference {file} was "
                                       "written with")
    return profile


def site_gate(gate: InputGate, features: np.ndarray | None) -> InputGate:
    """A copy of ``gate`` whose out-of-distribution reference also holds the site's films (``(N, F)`` pooled
    features of the films the gate accepted, from the unadapted model, as the gate reads them). Its threshold and
    band are kept: a film of the site's ordinary kind now finds close neighbours and leaves the "read with care"
    band; the view check, which refuses laterals, CT slices and photographs, is unchanged."""
    if gate.ood is None or features is None or len(features) == 0:
        return gate
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    reference = np.vstack([np.asarray(gate.ood.reference, dtype=np.float32), x])
    return dataclasses.replace(gate, ood=dataclasses.replace(gate.ood, reference=reference))


def write_gate_reference(folder: Path, features: np.ndarray) -> dict[str, Any]:
    """Write the site's gate reference atomically into the profile's folder; returns its entry for ``site.json``."""
    import torch

    buffer = io.BytesIO()
    torch.save(torch.from_numpy(np.ascontiguousarray(features)).half(), buffer)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / GATE_FILE, buffer.getvalue())
    return {"file": GATE_FILE, "films": int(len(features)), "sha256": file_digest(folder / GATE_FILE)}


def read_gate_reference(folder: str | os.PathLike) -> np.ndarray | None:
    """The site's gate reference of the profile in ``folder`` (None when it has none or its hash does not match
    ``site.json``); use it with :func:`site_gate`."""
    folder = Path(folder)
    return _gate_reference(folder, json.loads((folder / RECORD).read_text(encoding="utf-8")).get("gate_reference"))


def _gate_reference(folder: Path, entry: dict[str, Any] | None) -> np.ndarray | None:
    """The gate reference ``site.json``'s ``entry`` names in ``folder``, or None (no entry, no file, another hash)."""
    import torch

    if not entry or not (folder / entry["file"]).is_file() or file_digest(folder / entry["file"]) != entry["sha256"]:
        return None
    return torch.load(folder / entry["file"], weights_only=True).float().numpy()


def _read_bn_stats(folder: Path, record: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The profile's batch-norm statistics, checked against the hash ``site.json`` records."""
    import torch

    bn = record.get("bn") or {}
    file = folder / str(bn.get("file", BN_FILE))
    if not file.is_file() or file_digest(file) != bn.get("sha256"):
        raise SiteProfileError(f"{file}: missing, or not the statistics {folder / RECORD} was written with")
    try:
        stats = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise SiteProfileError(f"{file}: unreadable batch-norm statistics ({type(exc).__name__})") from exc
    return stats


def apply_profile(ckpt: dict[str, Any], profile: SiteProfile | None) -> dict[str, Any]:
    """The checkpoint dict with the profile's batch-norm statistics and prior shift in its weights (see the module
    docstring) and its temperature, plus ``"site"`` (:meth:`SiteProfile.summary`); ``ckpt`` itself is not changed.
    A refused profile, or None, returns ``ckpt`` as it is.

    Raises:
        SiteProfileError: the statistics do not fit the model's layers, or the classes differ.
    """
    if profile is None or not profile.adapted:
        return ckpt
    import torch

    record = profile.record
    if list(record["classes"]) != list(ckpt["classes"]):
        raise SiteProfileError(f"site profile {profile.name}: classes {record['classes']} are not the model's")
    state = dict(ckpt["model"])
    for layer, stats in profile.bn_stats.items():
        for stat, key in (("mean", "running_mean"), ("var", "running_var")):
            name = f"{layer}.{key}"
            if name not in state or state[name].shape != stats[stat].shape:
                raise SiteProfileError(f"site profile {profile.name}: {name} does not fit the model")
            state[name] = stats[stat].to(state[name].dtype)
    temperature = float(record["temperature"])
    offsets = torch.tensor([temperature * float(o) for o in record["logit_offsets"]], dtype=torch.float64)
    if "head.bias" not in state or not all(math.isfinite(o) for o in offsets.tolist()):
        raise SiteProfileError(f"site profile {profile.name}: the model has no head bias to shift")
    state["head.bias"] = (state["head.bias"].double() + offsets).to(state["head.bias"].dtype)
    return {**ckpt, "model": state, "temperature": temperature, "site": profile.summary()}


def site_profiles(checkpoint: str | os.PathLike) -> list[Path]:
    """The profile folders under ``RUN/sites/`` of a checkpoint (sorted by name; unchecked)."""
    folder = Path(checkpoint).parent / SITES_FOLDER
    return sorted(p.parent for p in folder.glob(f"*/{RECORD}")) if folder.is_dir() else []
