"""What a paper needs beyond the metrics, computed from the evaluation's per-image outputs: the failure gallery, the
subgroup results and the decision curves of the internal split and of each ``--external`` folder
(``metrics.json["publication"]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.data.manifest import load_manifest, resolve_data_path
from covidxr.errors import CovidxrError
from covidxr.evaluation.analysis import default_positive
from covidxr.evaluation.decision_curve import decision_curve, plot_decision_curves
from covidxr.evaluation.film_pass import FilmPass
from covidxr.evaluation.gallery import gallery
from covidxr.evaluation.inputs import EvalOptions
from covidxr.evaluation.logits import SplitOutputs
from covidxr.evaluation.outputs import PLOT_FILES, predictions_frame
from covidxr.evaluation.plots import figure_png
from covidxr.evaluation.subgroups import SMALL_RULE, subgroups
from covidxr.files import atomic_write_bytes

DEMOGRAPHIC_COLUMNS = ("age", "sex")


def with_metadata(frame: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """The predictions frame with the metadata's ``age`` and ``sex`` (matched on ``path``) where it has them."""
    columns = [c for c in DEMOGRAPHIC_COLUMNS if c in metadata.columns and c not in frame.columns]
    if not columns:
        return frame
    lookup = metadata.drop_duplicates("path").set_index("path")[columns]
    return frame.join(lookup, on="path")


def evaluated_sets(result: dict[str, Any], pred: SplitOutputs, analysis: dict[str, Any], out: Path,
                   frames: Mapping[str, pd.DataFrame] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """``(name, predictions frame with demographics)`` of the evaluated split and of each external folder (its frame
    from ``frames`` when this call made it, else its predictions CSV in ``out``)."""
    frames = frames or {}
    classes = result["classes"]
    internal = predictions_frame(pred, analysis["_probs"], analysis["_raw"], classes)
    label = "external" if result.get("data_is_external") else "internal"
    sets = [(f"{label}-{result['split']}", with_metadata(internal, pred.table))]
    for ext in result.get("external") or []:
        frame = frames.get(ext["name"])
        if frame is None:
            frame = pd.read_csv(out / ext["predictions"], dtype={"patient_id": str, "source": str, "view": str},
                                keep_default_na=False)
        try:
            metadata = load_manifest(resolve_data_path(ext["data"]))
        except CovidxrError:
            metadata = pd.DataFrame(columns=["path"])
        sets.append((ext["name"], with_metadata(frame, metadata)))
    return sets


def publication_extras(result: dict[str, Any], pred: SplitOutputs, analysis: dict[str, Any], opts: EvalOptions,
                       out: Path, frames: Mapping[str, pd.DataFrame] | None = None,
                       films: Mapping[str, FilmPass] | None = None) -> dict[str, Any]:
    """The failure gallery (pictures under ``out/gallery/``, the heat maps of the evaluation's film pass), subgroups
    and decision curves (``decision_curve.png``); ``frames`` are the external folders' predictions and ``films`` each
    set's film pass with its gallery's films (the internal set's under ``""``).

    Returns:
        ``{"positive", "small_rule", "gallery", "subgroups": {set: ...}, "decision_curves": [...], "plots"}``.
    """
    classes = result["classes"]
    positive = default_positive(classes, opts.positive)
    sets = evaluated_sets(result, pred, analysis, out, frames)
    extras: dict[str, Any] = {"positive": positive, "small_rule": SMALL_RULE, "gallery": [], "subgroups": {},
                              "decision_curves": [], "plots": {}}
    if opts.gallery > 0:
        by_set = {(sets[0][0] if name == "" else name): f for name, f in (films or {}).items()}
        extras["gallery"] = gallery(sets, classes, out, by_set, opts.gallery)
    extras["subgroups"] = {name: subgroups(frame, classes, positive, opts.bootstrap, opts.seed)
                           for name, frame in sets}
    if positive is not None:
        externals = sets[1:] or sets[:1]  # the external folders; the evaluated split when there is none
        extras["decision_curves"] = [decision_curve(name, frame["label"].tolist(), frame[classes].to_numpy(),
                                                    classes, positive, opts.prevalence) for name, frame in externals]
        if any(c.get("curve") for c in extras["decision_curves"]):
            png = figure_png(plot_decision_curves(extras["decision_curves"]))
            atomic_write_bytes(out / PLOT_FILES["decision_curve"], png)
            extras["plots"]["decision_curve"] = PLOT_FILES["decision_curve"]
    return extras
