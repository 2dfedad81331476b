"""The loaded model's saved evaluation, read defensively, and the one line of figures the page quotes under a film's
answer (:func:`reliability_line`).

Numbers come from ``python -m covidxr.evaluate`` only (``eval/metrics.json`` beside the checkpoint, or the summary
stored in the checkpoint); nothing is recomputed. External results come from two places: an ``external`` list of test
sets inside metrics.json, and the evaluations of external datasets beside the checkpoint
(``python -m covidxr.evaluate --checkpoint RUN/best.pt --data OTHER`` writes ``eval-OTHER/metrics.json`` with
``"external": true``). Held-out-source cross-validation is metrics.json's ``crossval``. Every reader here copes with
these being absent or partial, so older runs still show what they have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from covidxr.inference.decision import OperatingPoint
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
                "gate", "covid_vs_rest")
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


def _covid_sets(evaluation: Evaluation, prefix: str) -> list[Mapping[str, Any]]:
    """metrics.json's COVID-or-not sets whose name starts with ``prefix`` ("external ", "internal "), then those of
    the external evaluations found beside the checkpoint."""
    found = [s for s in (evaluation.data.get("covid_vs_rest") or {}).get("sets") or [] if isinstance(s, Mapping)]
    if prefix == "external ":
        found += [s for run in evaluation.external_runs for s in (run.get("covid_vs_rest") or {}).get("sets") or []
                  if isinstance(s, Mapping)]
    return [s for s in found if str(s.get("name", "")).startswith(prefix) and ": " not in str(s.get("name"))]


def _counts(covid_set: Mapping[str, Any], point: OperatingPoint) -> tuple[int, int, int, int] | None:
    """``(COVID films found, COVID films, other films called COVID, other films)`` of a set scored at ``point``'s
    threshold, or None when it was scored at another one or lacks a number."""
    threshold = covid_set.get("threshold")
    sens = (covid_set.get("sensitivity") or {}).get("estimate")
    spec = (covid_set.get("specificity") or {}).get("estimate")
    positives, negatives = covid_set.get("n_positive"), covid_set.get("n_negative")
    if point.threshold is None or not isinstance(threshold, (int, float)) or abs(threshold - point.threshold) > 1e-6:
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (sens, spec)) or not positives or \
            not negatives:
        return None
    return round(sens * positives), int(positives), round((1 - spec) * negatives), int(negatives)


def _one_collection(evaluation: Evaluation, covid_set: Mapping[str, Any], positive: str) -> bool:
    """Whether the COVID films of an external COVID-or-not set all come from one collection that gives no other
    class (its test set's per-source class counts say so)."""
    name = str(covid_set.get("name", "")).removeprefix("external ")
    sets = [s for s in evaluation.external if s.get("name") == name] or (
        evaluation.external if len(evaluation.external) == 1 else [])
    for test_set in sets:
        groups = test_set.get("by_source") or {}
        with_covid = [g.get("class_counts") or {} for g in groups.values() if isinstance(g, Mapping)
                      and isinstance(g.get("class_counts"), Mapping) and (g["class_counts"].get(positive) or 0)]
        if len(with_covid) == 1 and sum(bool(n) for n in with_covid[0].values()) == 1:
            return True
    return False


def _frequencies(counts: tuple[int, int, int, int]) -> str:
    found, positives, false, negatives = counts
    calls = found + false
    right = f"; {found} of its {calls} COVID calls were right" if calls else ""
    return (f"it found {found} of {positives} COVID films and wrongly called {false} of {negatives} other films "
            f"COVID{right}")


def reliability_line(evaluation: Evaluation | None, point: OperatingPoint) -> str:
    """How the page's COVID answer did, in natural frequencies, films from hospitals the model never saw first.

    The one place the page and the model tab quote the model's COVID figures from: metrics.json's COVID-or-not sets
    scored at the shipped threshold (``point``), so every sentence quotes one sensitivity per set and operating
    point. Without an external set it says so and quotes the internal test as an upper bound.

    Args:
        evaluation: the saved evaluation, or None.
        point: the operating point the page applies (``Predictor.operating_point``).

    Returns:
        One Markdown sentence (no paths).
    """
    if evaluation is None:
        return "This model has not been evaluated, so there is no measured basis for its answer at all."
    if point.positive is None:
        return "This model has no COVID class, so no COVID figures are quoted."
    if point.threshold is None:
        return ("No COVID threshold was stored with this model (evaluate it to fix one), so no figures are quoted "
                "for its answer.")
    for covid_set in _covid_sets(evaluation, "external "):
        counts = _counts(covid_set, point)
        if counts is not None:
            one = _one_collection(evaluation, covid_set, point.positive)
            caution = (f" All {counts[1]} COVID films there come from one collection, so part of this may be "
                       "recognising the collection rather than the disease." if one else "")
            return (f"On {counts[1] + counts[3]} films from hospitals it never saw, {_frequencies(counts)}."
                    + caution)
    internal = next((c for s in _covid_sets(evaluation, "internal ") if (c := _counts(s, point))), None)
    untested = "It has **not** been tested at this threshold on films from hospitals it never saw"
    if internal is None:
        return untested + ", and no COVID figures were saved for it."
    return (f"{untested}; on {internal[1] + internal[3]} internal test films from the sources it learned from, "
            f"{_frequencies(internal)} (an upper bound for other hospitals).")
