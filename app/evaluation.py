"""The loaded model's saved evaluation, read defensively, and what a single prediction's trust rests on.

Numbers come from ``python -m covidxr.evaluate`` only (``eval/metrics.json`` beside the checkpoint, or the summary
stored in the checkpoint); nothing is recomputed. External results come from two places: an ``external`` list of test
sets inside metrics.json, and the evaluations of external datasets beside the checkpoint
(``python -m covidxr.evaluate --checkpoint RUN/best.pt --data OTHER`` writes ``eval-OTHER/metrics.json`` with
``"external": true``). Held-out-source cross-validation is metrics.json's ``crossval``. Every reader here copes with
these being absent or partial, so older runs still show what they have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from app.format import interval, pct, probability
from covidxr.sources_display import source_name


@dataclass(frozen=True)
class Evaluation:
    """A saved evaluation of the loaded model.

    Attributes:
        data: metrics.json's content (or the checkpoint's summary of it).
        folder: the evaluation folder (plots, report.html); None for the checkpoint's summary alone.
        notes: remarks to show (e.g. the file belongs to another checkpoint); never server paths.
    """

    data: Mapping[str, Any]
    folder: Path | None = None
    notes: list[str] = field(default_factory=list)
    external_runs: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def external(self) -> list[Mapping[str, Any]]:
        """External test sets with metrics: metrics.json's ``external`` list, then the external evaluations found
        beside the checkpoint (possibly none)."""
        sets = self.data.get("external")
        sets = [sets] if isinstance(sets, Mapping) else sets if isinstance(sets, (list, tuple)) else []
        sets = [s for s in sets if isinstance(s, Mapping) and isinstance(s.get("metrics"), Mapping)]
        seen = {(dataset_name(s), s.get("n_images")) for s in sets}  # the same data evaluated both ways: once
        return sets + [s for s in self.external_runs if isinstance(s.get("metrics"), Mapping)
                       and (dataset_name(s), s.get("n_images")) not in seen]

    @property
    def crossval_rows(self) -> list[Mapping[str, Any]]:
        """Held-out-source cross-validation, one entry per held-out source (possibly none): ``crossval.json``'s
        ``folds`` (each a held-out result with ``name``, ``metrics``, ``ci``) or summary ``rows``."""
        crossval = self.data.get("crossval")
        if not isinstance(crossval, Mapping):
            return []
        rows = crossval.get("folds") or crossval.get("rows")
        return [r for r in rows or [] if isinstance(r, Mapping)]

    @property
    def report(self) -> Path | None:
        """The HTML report of this evaluation, when it exists."""
        path = self.folder / "report.html" if self.folder else None
        return path if path is not None and path.is_file() else None


@st.cache_data(max_entries=16, show_spinner=False)
def _read_json(path: str, mtime_ns: int) -> dict[str, Any] | None:
    """A JSON object from a file (cached per path and modification time, which is part of the key only)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics_json_path(predictor: Any) -> Path:
    """Where the evaluation CLI wrote metrics.json for this checkpoint (the summary names it relative to the run)."""
    run_dir = Path(predictor.checkpoint_path).parent
    saved = (getattr(predictor, "metrics", None) or {}).get("metrics_json")
    if saved and (run_dir / str(saved)).is_file():
        return run_dir / str(saved)
    return run_dir / "eval" / "metrics.json"


def dataset_name(data: Mapping[str, Any]) -> str:
    """An external test set's name: its sources as datasets ("COVID-CXNet + chest X-ray teaching films"), else its
    recorded name or its data folder's name (never a full path)."""
    sources = [s for s in (data.get("by_source") or {}) if s not in ("(unknown)", "(missing)")]
    if sources:
        return " + ".join(dict.fromkeys(source_name(s) for s in sources))
    if data.get("name"):
        return source_name(data["name"])
    return Path(str(data.get("data") or "external data")).name


def external_runs(predictor: Any, shas: set[Any]) -> list[dict[str, Any]]:
    """The evaluations of external datasets beside the checkpoint (``eval-*/metrics.json`` with
    ``"data_is_external": true``) made with this checkpoint (its SHA-256 before or after the evaluation stored its
    summary in it)."""
    found = []
    for path in sorted(Path(predictor.checkpoint_path).parent.glob("eval-*/metrics.json")):
        data = _read_json(str(path), path.stat().st_mtime_ns)
        external = data and (data.get("data_is_external") is True or data.get("external") is True)
        if not external or data.get("checkpoint_sha256") not in shas:
            continue
        keys = ("n_images", "n_patients", "metrics", "ci", "by_source", "baselines", "calibration", "warnings",
                "gate")
        found.append({"name": dataset_name(data), **{k: data.get(k) for k in keys}})
    return found


def load_evaluation(predictor: Any) -> Evaluation | None:
    """The saved evaluation of the loaded model, or None when it has not been evaluated.

    The full metrics.json is used when it records the same checkpoint SHA-256 as the checkpoint's own summary (or,
    without a summary, as the checkpoint file); otherwise the checkpoint's summary is shown with a note saying why.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
    """
    path = _metrics_json_path(predictor)
    full = _read_json(str(path), path.stat().st_mtime_ns) if path.is_file() else None
    summary = getattr(predictor, "metrics", None) or None
    shas = {predictor.checkpoint_sha256, (summary or {}).get("checkpoint_sha256")} - {None}
    external = external_runs(predictor, shas)
    if full is None:
        return Evaluation(summary, external_runs=external) if summary else None
    if summary is not None and full.get("checkpoint_sha256") != summary.get("checkpoint_sha256"):
        return Evaluation(summary, path.parent, ["The evaluation folder beside the checkpoint comes from another "
                                                 "evaluation than the one stored in the checkpoint; showing the "
                                                 "checkpoint's own summary."], external)
    if summary is None and full.get("checkpoint_sha256") not in (None, predictor.checkpoint_sha256):
        return Evaluation(full, path.parent, ["This evaluation was computed for another checkpoint file; its "
                                              "numbers may not describe the loaded model. Evaluate again."], external)
    return Evaluation(full, path.parent, [], external)


def _class_recall(test_set: Mapping[str, Any], label: str) -> str | None:
    """The recall of ``label`` on a test set with its interval, or None when the set has no such images."""
    per_class = (test_set.get("metrics") or {}).get("per_class") or {}
    values = per_class.get(label) if isinstance(per_class, Mapping) else None
    if not isinstance(values, Mapping) or not values.get("support"):
        return None
    ci = (((test_set.get("ci") or {}).get("per_class") or {}).get(label) or {}).get("sensitivity")
    return interval(ci, pct, values.get("recall"))


def _ece(test_set: Mapping[str, Any]) -> Any:
    """The expected calibration error measured on a test set (after temperature scaling), or None."""
    calibration = test_set.get("calibration") or {}
    for value in (calibration.get("ece_after"), calibration.get("ece"), (test_set.get("metrics") or {}).get("ece")):
        if isinstance(value, (int, float)):
            return value
    return None


def external_ece(evaluation: Evaluation | None) -> float | None:
    """The worst expected calibration error measured on films from sources the model never saw (the external test
    sets, then the held-out sources of cross-validation), or None when none was measured."""
    if evaluation is None:
        return None
    found = [_ece(s) for s in [*evaluation.external, *evaluation.crossval_rows]]
    found = [float(e) for e in found if e is not None]
    return max(found) if found else None


def _crossval_basis(rows: list[Mapping[str, Any]]) -> str | None:
    """One sentence on held-out-source cross-validation: each source left out of training in turn."""
    values = [v for r in rows if isinstance(v := (r.get("metrics") or {}).get("balanced_accuracy")
                                             or (r.get("balanced_accuracy") or {}).get("estimate"), (int, float))]
    if not values:
        return None
    spread = pct(min(values)) if pct(min(values)) == pct(max(values)) else f"{pct(min(values))} to {pct(max(values))}"
    return (f"When each of {len(rows)} sources was in turn left out of training, the recipe's balanced accuracy on "
            f"the left-out source was {spread}.")


def internal_basis(data: Mapping[str, Any]) -> str:
    """"N internal test images (same sources as training; balanced accuracy X (lo–hi))"."""
    ci = ((data.get("ci") or {}).get("metrics") or {}).get("balanced_accuracy")
    balanced = interval(ci, pct, (data.get("metrics") or {}).get("balanced_accuracy"))
    return (f"{data.get('n_images', '?')} internal test images from the same sources it learned from "
            f"(balanced accuracy {balanced})")


def trust_basis(evaluation: Evaluation | None, label: str) -> list[str]:
    """Sentences saying what a prediction of ``label`` rests on, what matters most first: films from hospitals the
    model never saw (external test sets, held-out-source cross-validation), then the internal test.

    Args:
        evaluation: the saved evaluation, or None.
        label: the predicted class.

    Returns:
        Markdown sentences (no paths).
    """
    if evaluation is None:
        return ["This model has not been evaluated, so there is no measured basis for this output at all."]
    internal = f"On {internal_basis(evaluation.data)}."
    crossval = _crossval_basis(evaluation.crossval_rows)
    external = evaluation.external
    if not external and not crossval:
        return [f"This model has **not** been tested on films from hospitals it never saw, so how it does elsewhere "
                f"is unknown; it was tested only on {internal_basis(evaluation.data)}."]
    sentences = []
    for test_set in external:
        name = dataset_name(test_set)
        recall = _class_recall(test_set, label)
        what = (f"its {label} recall was {recall}" if recall else
                f"its {label} recall could not be measured (no {label} films there)")
        sentence = (f"On films from hospitals it never saw ({name}, {test_set.get('n_images', '?')} images), "
                    f"{what}")
        ece = _ece(test_set)
        if ece is not None:
            sentence += (f"; its stated probabilities were off by {probability(ece)} on average there "
                         "(expected calibration error)")
        sentences.append(sentence + ".")
    return [*sentences, *([crossval] if crossval else []), internal]
