"""``evaluate --external DIR``: every external folder evaluated in the same call as the internal test split, and the
cross-validation by source (``python -m covidxr.crossval``) read back for the report.

An external folder reuses what the internal evaluation of the same call chose on the run's validation split: the
temperature and the operating points' thresholds. Nothing is fitted, tuned or chosen on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.errors import CovidxrError, one_line
from covidxr.evaluation.analysis import analyse, source_warnings, split_warnings
from covidxr.evaluation.covid_vs_rest import absent_class_calls
from covidxr.evaluation.film_pass import FilmPass
from covidxr.evaluation.film_sets import predict_set, with_gallery
from covidxr.evaluation.inputs import EvalOptions, load_eval_data
from covidxr.evaluation.lung_share import lung_share_summary
from covidxr.evaluation.outputs import predictions_frame
from covidxr.files import atomic_write_bytes
from covidxr.inference.predictor import Predictor
from covidxr.lungs import LungModel
from covidxr.model.calibration import Calibration, Origin
from covidxr.model.trained import TrainedModel

CROSSVAL_JSON = Path("crossval") / "crossval.json"  # beside the checkpoint, where python -m covidxr.crossval writes


@dataclass(frozen=True)
class ExternalPass:
    """The predictions of one external folder, kept in memory for the failure gallery (not read back from CSV)."""

    name: str
    frame: pd.DataFrame  # predictions_frame: path, label, predicted, one probability column per class, ...
    films: FilmPass  # its film pass: heat maps and lung shares of the lung share's sample and the gallery's errors


def internal_calibration(stored: Calibration, result: dict[str, Any]) -> Calibration:
    """The model's calibration as the internal evaluation of this call leaves it: its temperature (and where it came
    from) and the operating points and COVID threshold it chose on validation."""
    cal = result["calibration"]
    return stored.with_thresholds(cal["temperature"], Origin(cal["origin"]), cal["how"], result.get("operating_points"),
                                  result.get("covid_vs_rest"))


def external_names(folders: Sequence[Path]) -> list[str]:
    """A distinct, file-name-safe name per folder (its own name, numbered when two share one)."""
    names: list[str] = []
    for folder in folders:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).resolve().name).strip("-") or "external"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def evaluate_external(model: TrainedModel, calibration: Calibration, folder: Path, name: str, opts: EvalOptions,
                      split_table: pd.DataFrame | None, out: Path, predictor: Predictor,
                      lungs: LungModel | None) -> tuple[dict[str, Any], ExternalPass]:
    """Evaluate one external folder with the internal evaluation's calibration and write its predictions CSV into
    ``out``.

    Args:
        model: The trained model (loaded once for the whole evaluation).
        calibration: The internal evaluation's calibration (:func:`internal_calibration`).
        folder: The external dataset (folder or manifest).
        name: Its name in metrics.json and the report.
        opts: The evaluation options (bootstrap, seed, device, loaders).
        split_table: The run's split (the baselines learn on its train rows; overlap with the run is flagged).
        out: The evaluation folder.
        predictor: The same model as a torch predictor (the film pass: lung share and gallery heat maps).
        lungs: The lung model of the lung share, or None.

    Returns:
        The ``metrics.json["external"]`` entry of this folder, and its predictions (for the gallery).

    Raises:
        CovidxrError: The folder is the run's own data, or has no readable image.
    """
    data = load_eval_data(model, replace(opts, data=str(folder), split="all"), prepare=opts.tta)
    if data.own:
        raise CovidxrError(f"--external {folder}: this is the run's own data, not an external dataset")
    data, films, pred = predict_set(model, predictor, lungs, data, opts, False, f"films: {name}",
                                    f"--external {folder}: no readable image")
    analysis = analyse(model.classes, calibration, data, pred, split_table, opts)
    classes = list(model.classes)
    predictions = f"predictions-external-{name}.csv"
    frame = predictions_frame(pred, analysis["_probs"], analysis["_raw"], classes)
    atomic_write_bytes(out / predictions, frame.to_csv(index=False).encode("utf-8"))
    films = with_gallery(predictor, lungs, films, frame, classes, opts, desc=f"gallery: {name}")
    metrics = analysis["metrics"]
    covid = analysis["covid_vs_rest"]
    if covid is not None:
        covid["sets"] = [{**covid["sets"][0], "name": f"external {name}"}]
    entry = {
        "name": name, "data": str(data.data_path), "n_images": int(len(pred.y)),
        "n_patients": int(pred.table["patient_id"].nunique()),
        "class_counts": {c: metrics["per_class"][c]["support"] for c in classes},
        "metrics": metrics, "ci": analysis["ci"], "by_source": analysis["by_source"],
        "by_view": analysis["by_view"], "baselines": analysis["baselines"],
        "calibration": {**analysis["calibration"], "measured_on": f"external {name} (all images)"},
        "operating_points": analysis["operating_points"], "covid_vs_rest": covid,
        "absent_class_calls": absent_class_calls(pred.y, analysis["_probs"], classes),
        "warnings": source_warnings(pred.table) + split_warnings(data, pred, analysis["_calibration"]),
        "unreadable": dict(data.run.unreadable), "predictions": predictions,
        "lung_share": lung_share_summary(predictor, pred.table, opts.lung_share_limit, films, opts.seed),
    }
    return entry, ExternalPass(name, frame, films)


def read_crossval(checkpoint: Path, path: Path | None) -> dict[str, Any] | None:
    """The crossval.json content: ``path`` when given, else ``crossval/crossval.json`` beside the checkpoint if any.

    Raises:
        CovidxrError: ``path`` is missing or unreadable.
    """
    if path is None:
        path = checkpoint.parent / CROSSVAL_JSON
        if not path.is_file():
            return None
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "crossval.json"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CovidxrError(f"--crossval {path}: unreadable ({one_line(exc)})") from exc
    if not isinstance(content, dict) or "folds" not in content:
        raise CovidxrError(f"--crossval {path}: not a crossval.json (no 'folds'); write one with "
                           "python -m covidxr.crossval")
    return {**content, "file": str(path.resolve())}
