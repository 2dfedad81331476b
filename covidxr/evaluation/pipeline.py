"""The evaluation from checkpoint to files: load the data, predict, analyse, write the outputs, and (for the run's
own data) write the temperature and a summary into the checkpoint's calibration sidecar (never into the checkpoint).
The command line is :mod:`covidxr.evaluation.__main__` (``python -m covidxr.evaluate``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from covidxr.data.manifest import resolve_data_path
from covidxr.data.run_folder import RunFolder
from covidxr.errors import CovidxrError
from covidxr.evaluation.analysis import analyse, default_positive, source_warnings, split_warnings
from covidxr.evaluation.checklist import write_checklist
from covidxr.evaluation.external import (
    ExternalPass,
    evaluate_external,
    external_names,
    internal_calibration,
    read_crossval,
)
from covidxr.evaluation.film_pass import FilmPass
from covidxr.evaluation.film_sets import predict_set, with_gallery
from covidxr.evaluation.gate_report import gate_report
from covidxr.evaluation.heldout_calibration import load_heldout_logits
from covidxr.evaluation.inputs import EvalData, EvalOptions, load_eval_data
from covidxr.evaluation.logits import SplitOutputs
from covidxr.evaluation.lung_share import lung_model_for, lung_share_summary
from covidxr.evaluation.model_card import model_card
from covidxr.evaluation.outputs import (
    default_out,
    evaluation_summary,
    jsonable,
    load_history,
    make_plots,
    predictions_frame,
    read_explain,
    reproducibility,
)
from covidxr.evaluation.pdf import write_pdf
from covidxr.evaluation.publication import publication_extras
from covidxr.evaluation.records import EvaluationRecord, evaluation_record, record_json
from covidxr.evaluation.report_sections import build_report
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel
from covidxr.model.calibration_file import write_calibration
from covidxr.model.trained import TrainedModel
from covidxr.networks.tta import VIEWS


class _Stages:
    """A progress bar over the evaluation's stages that also times them."""

    def __init__(self, total: int, progress: bool) -> None:
        self.bar = tqdm(total=total, desc="evaluate", disable=None if progress else True, leave=False)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Run one stage: show its name, time it, advance the bar."""
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.bar.update(1)


def assemble(model: TrainedModel, predictor: Predictor, data: EvalData, pred: SplitOutputs, analysis: dict[str, Any],
             split_table: pd.DataFrame | None, opts: EvalOptions, out: Path, films: FilmPass) -> dict[str, Any]:
    """Put the metrics.json content together (without plots and final timings)."""
    result = {k: v for k, v in analysis.items() if not k.startswith("_")}
    warnings = source_warnings(pred.table) + split_warnings(data, pred, analysis["_calibration"])
    if result["ci"] is None:
        warnings.append("--bootstrap 0: no confidence intervals")
    if opts.tta:
        warnings.append(f"--tta: every probability is the mean over {len(VIEWS)} views of the film "
                        "(covidxr.networks.tta); the "
                        "app and predict show single-view probabilities, so these numbers are not theirs")
    card = model_card(model, data, pred.table, split_table, result["metrics"], result["ci"])
    card["model"]["calibration"] = result["calibration"]["how"]  # the model card says which calibration was used
    return {
        "checkpoint": str(opts.checkpoint), "checkpoint_sha256": model.sha256, "split": data.split,
        "data": str(data.data_path), "data_is_external": not data.own, "n_images": int(len(pred.y)),
        "n_patients": int(pred.table["patient_id"].nunique()), "classes": list(model.classes),
        **result, "plots": {}, "reproducibility": {}, "warnings": warnings, "explain": read_explain(out),
        "unreadable": dict(data.run.unreadable),
        "model_card": card,
        "external": [], "crossval": None,
        "lung_share": lung_share_summary(predictor, pred.table, opts.lung_share_limit, films, opts.seed),
    }


def covid_summary(result: dict[str, Any]) -> dict[str, Any] | None:
    """metrics.json's ``covid_vs_rest``: the threshold and where it was chosen, then the internal split (and each of
    its sources with both kinds of film), each held-out source of the crossval and each external folder."""
    internal = result.get("covid_vs_rest")
    if internal is None:
        return None
    folds = [{**f["covid_vs_rest"], "name": f"held out: {f['name']}", "threshold": None}
             for f in (result.get("crossval") or {}).get("folds", []) if f.get("covid_vs_rest")]
    external = [s for e in result.get("external") or [] for s in (e.get("covid_vs_rest") or {}).get("sets", [])]
    return {**internal, "sets": internal["sets"] + folds + external}


def external_results(model: TrainedModel, predictor: Predictor, lungs: LungModel | None, result: dict[str, Any],
                     split_table: pd.DataFrame | None, opts: EvalOptions,
                     out: Path) -> list[tuple[dict[str, Any], ExternalPass]]:
    """Evaluate every ``--external`` folder with the temperature and thresholds this call chose on validation."""
    calibration = internal_calibration(model.calibration, result)
    return [evaluate_external(model, calibration, Path(folder).expanduser().resolve(), name, opts, split_table, out,
                              predictor, lungs)
            for folder, name in zip(opts.external, external_names(opts.external), strict=True)]


def as_record(result: dict[str, Any]) -> EvaluationRecord:
    """The metrics.json record of the evaluation's result so far (what the report shows and the file holds)."""
    return evaluation_record(jsonable(result))


def write_outputs(out: Path, result: dict[str, Any], pred: SplitOutputs, analysis: dict[str, Any],
                  history: pd.DataFrame | None) -> None:
    """Write predictions.csv, the PNG plots and report.html (metrics.json is written last, by the caller)."""
    classes = result["classes"]
    frame = predictions_frame(pred, analysis["_probs"], analysis["_raw"], classes)
    atomic_write_bytes(out / "predictions.csv", frame.to_csv(index=False).encode("utf-8"))
    plots = make_plots(out, pred, analysis["_probs"], analysis["_raw"], classes,
                       result["metrics"]["confusion_matrix"], history)
    for name, file in ((result.get("publication") or {}).get("plots") or {}).items():
        plots[name] = (file, (out / file).read_bytes())
    result["plots"] = {name: file for name, (file, _) in plots.items()}
    result["checklist"] = write_checklist(out, result)
    atomic_write_text(out / "report.html", build_report(as_record(result), plots, out))


def finish(out: Path, result: dict[str, Any], model: TrainedModel, data: EvalData, pred: SplitOutputs,
           analysis: dict[str, Any], opts: EvalOptions) -> None:
    """Write predictions, plots and report; for the run's own data, write the checkpoint's calibration sidecar
    (temperature, thresholds, summary), pinned to the checkpoint's SHA-256, unless the evaluation used test-time
    augmentation (a temperature fitted on averaged views does not fit single predictions). The checkpoint itself is
    never changed."""
    write_outputs(out, result, pred, analysis, load_history(model))
    result["summary"] = evaluation_summary(result, opts.checkpoint, out)
    if data.own and not opts.tta:
        cal = result["calibration"]
        path = write_calibration(opts.checkpoint, result["checkpoint_sha256"], cal["temperature"], cal["how"],
                                 result["summary"], origin=cal["origin"])
        result["reproducibility"]["calibration_file"] = path.name


def _site_options(opts: EvalOptions) -> EvalOptions:
    """The options of an evaluation with ``--site``: checked, with the parts that rebuild the unadapted model from the
    checkpoint file (the failure gallery's and the lung share's heat maps) turned off.

    Raises:
        CovidxrError: ``--site`` with ``--external`` or ``--tta``.
    """
    if opts.external or opts.tta:
        raise CovidxrError("--site evaluates one site's films (--data FOLDER); it cannot be combined with --external "
                           "or --tta")
    return replace(opts, gallery=0, lung_share_limit=0)


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate a checkpoint and write metrics.json, predictions.csv, report.html and the plots.

    Args:
        opts: The options (``opts.checkpoint`` is required).

    Returns:
        The content of metrics.json plus ``"out"``, the output folder.

    Raises:
        CovidxrError: Unusable checkpoint, dataset or options (one-line message).
    """
    start = time.perf_counter()
    opts = replace(opts, checkpoint=Path(opts.checkpoint).expanduser().resolve())
    if opts.site is not None:
        opts = _site_options(opts)
    # The one trained model of this evaluation: every stage below runs it (no stage rebuilds it from the file).
    model = TrainedModel.load(opts.checkpoint, device=opts.device, site=opts.site)
    predictor = Predictor(model)  # the same model as the app runs it, for the gate, the lung share and the gallery
    profile = model.site
    default_positive(model.classes, opts.positive)  # fail early on a bad --positive
    for folder in opts.gate_check:
        if not Path(folder).is_dir():
            raise CovidxrError(f"--gate-check {folder}: not a folder")
    stages = _Stages(7, opts.progress)
    try:
        with stages("load data"):
            data = load_eval_data(model, opts, prepare=opts.tta)
            if profile is not None and data.own:
                raise CovidxrError("--site: evaluate an adapted model on that site's films (--data FOLDER), not on "
                                   "the run's own data")
            split_table, _ = RunFolder.of(model).split()
            crossval = read_crossval(opts.checkpoint, opts.crossval)
            for folder in opts.external:
                resolve_data_path(str(folder))  # a missing --external folder fails before any prediction
            out = Path(opts.out).expanduser().resolve() if opts.out else default_out(opts.checkpoint, data, opts.tta,
                                                                                       profile and profile.name)
            if out.exists() and not out.is_dir():
                raise CovidxrError(f"--out {out} exists and is not a folder")
        with stages("predict"):
            # One pass over the evaluated films (each decoded once): the metrics' logits, the gate's verdicts, and
            # Grad-CAM for the lung share's sample; the validation rows come from the loaders.
            lungs = lung_model_for(predictor)[0] if opts.lung_share_limit > 0 or opts.gallery > 0 else None
            data, films, pred = predict_set(model, predictor, lungs, data, opts, True, "films: evaluated",
                                            f"no readable image in the evaluated split ({data.split}) of "
                                            f"{data.data_path}")
        with stages("metrics"):
            # External data reuses the checkpoint's calibration: the folds' logits are read for the run's own data only.
            heldout, why_not = (load_heldout_logits(crossval, dict(model.config), list(model.classes))
                                if data.own else (None, ""))
            analysis = analyse(model.classes, model.calibration, data, pred, split_table, opts, heldout)
            analysis["calibration"]["why_not_out_of_source"] = why_not or None
            frame = predictions_frame(pred, analysis["_probs"], analysis["_raw"], list(model.classes))
            films = with_gallery(predictor, lungs, films, frame, model.classes, opts, desc="gallery: evaluated")
            result = assemble(model, predictor, data, pred, analysis, split_table, opts, out, films)
            if profile is not None:
                result["site"] = {**profile.summary(), "describe": profile.describe()}
                result["warnings"].insert(0, f"site profile: the model is {profile.describe()} (profile SHA-256 "
                                             f"{profile.sha256[:12]}...); the gallery and the lung share are not "
                                             "computed for an adapted model")
        with stages("external"):
            external = external_results(model, predictor, lungs, result, split_table, opts, out)
            result["external"] = [entry for entry, _ in external]
            result["crossval"] = crossval
            result["covid_vs_rest"] = covid_summary(result)
        with stages("input gate"):
            result["gate"] = gate_report(predictor, pred.table, opts.gate_check, opts.gate_variants, opts.batch_size,
                                         opts.progress, films)
        with stages("gallery, subgroups, decision curves"):
            result["publication"] = publication_extras(result, pred, analysis, opts, out,
                                                       {p.name: p.frame for _, p in external},
                                                       {"": films, **{p.name: p.films for _, p in external}})
        with stages("report"):
            result["reproducibility"] = reproducibility(opts, model, data, split_table, stages.timings)
            finish(out, result, model, data, pred, analysis, opts)
            if opts.pdf:
                result["pdf"] = write_pdf(out / "report.html", out / "report.pdf")
    finally:
        stages.bar.close()
    result["reproducibility"]["timings_seconds"] = dict(stages.timings)
    result["reproducibility"]["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    content = record_json(as_record(result))
    atomic_write_text(out / "metrics.json", json.dumps(content, indent=2, allow_nan=False) + "\n")
    return {**result, "out": str(out)}
