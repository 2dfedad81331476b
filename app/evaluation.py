"""The loaded model's saved evaluation, read through the one metrics.json reader
(``covidxr.evaluation.results.read_record``), and the one line of figures the page quotes under a film's answer
(:func:`reliability_line`).

Numbers come from ``python -m covidxr.evaluate`` only (``eval/metrics.json`` beside the checkpoint, or the summary
stored with the checkpoint); nothing is recomputed. External results come from two places: the ``external`` test sets
inside metrics.json, and the evaluations of external datasets beside the checkpoint
(``python -m covidxr.evaluate --checkpoint RUN/best.pt --data OTHER`` writes ``eval-OTHER/metrics.json`` with
``"data_is_external": true``). Held-out-source cross-validation is metrics.json's ``crossval``. Older shapes of the
file are the reader's business; a file it cannot read is not shown, with a note saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from covidxr.errors import CovidxrError
from covidxr.evaluation.results import CovidSet, EvaluationRecord, ExternalSet, read_metrics, read_record
from covidxr.inference.decision import OperatingPoint
from covidxr.sources_display import source_name


@dataclass(frozen=True)
class Evaluation:
    """A saved evaluation of the loaded model.

    Attributes:
        record: metrics.json's record (or that of the checkpoint's summary of it).
        folder: the evaluation folder (plots, report.html); None for the checkpoint's summary alone.
        notes: remarks to show (e.g. the file belongs to another checkpoint); never server paths.
        external_runs: the evaluations of external data found beside the checkpoint, each as one external set.
    """

    record: EvaluationRecord
    folder: Path | None = None
    notes: list[str] = field(default_factory=list)
    external_runs: list[ExternalSet] = field(default_factory=list)

    @property
    def external(self) -> list[ExternalSet]:
        """External test sets with metrics: metrics.json's ``external`` list, then the external evaluations found
        beside the checkpoint (possibly none)."""
        sets = [s for s in self.record.external if s.metrics is not None]
        seen = {(dataset_name(s), s.n_images) for s in sets}  # the same data evaluated both ways: once
        return sets + [s for s in self.external_runs if s.metrics is not None
                       and (dataset_name(s), s.n_images) not in seen]

    @property
    def crossval_rows(self) -> list[dict[str, Any]]:
        """Held-out-source cross-validation, one entry per held-out source (possibly none): ``crossval.json``'s
        ``folds`` (each a held-out result with ``name``, ``metrics``, ``ci``) or summary ``rows``."""
        return self.record.crossval_folds

    @property
    def report(self) -> Path | None:
        """The HTML report of this evaluation, when it exists."""
        path = self.folder / "report.html" if self.folder else None
        return path if path is not None and path.is_file() else None


@st.cache_data(max_entries=16, show_spinner=False)
def _read(path: str, mtime_ns: int) -> EvaluationRecord | str:
    """The record of a metrics.json, or the one-line reason it cannot be read (cached per path and modification
    time, which is part of the key only)."""
    try:
        return read_metrics(path)
    except CovidxrError as exc:
        return str(exc)


def _metrics_json_path(predictor: Any) -> Path:
    """Where the evaluation CLI wrote metrics.json for this checkpoint (the summary names it relative to the run)."""
    run_dir = Path(predictor.checkpoint_path).parent
    saved = (getattr(predictor, "metrics", None) or {}).get("metrics_json")
    if saved and (run_dir / str(saved)).is_file():
        return run_dir / str(saved)
    return run_dir / "eval" / "metrics.json"


def dataset_name(data: ExternalSet | EvaluationRecord) -> str:
    """An external test set's name: its sources as datasets ("COVID-CXNet + chest X-ray teaching films"), else its
    recorded name or its data folder's name (never a full path)."""
    sources = [s for s in (data.by_source or {}) if s not in ("(unknown)", "(missing)")]
    if sources:
        return " + ".join(dict.fromkeys(source_name(s) for s in sources))
    name = getattr(data, "name", None)
    if name:
        return source_name(name)
    return Path(str(data.data or "external data")).name


def external_runs(predictor: Any, shas: set[Any]) -> list[ExternalSet]:
    """The evaluations of external datasets beside the checkpoint (``eval-*/metrics.json`` with
    ``"data_is_external": true``) made with this checkpoint (its SHA-256 before or after the evaluation stored its
    summary in it)."""
    found = []
    for path in sorted(Path(predictor.checkpoint_path).parent.glob("eval-*/metrics.json")):
        record = _read(str(path), path.stat().st_mtime_ns)
        if isinstance(record, str) or not record.data_is_external or record.checkpoint_sha256 not in shas:
            continue
        found.append(record.as_external_set(dataset_name(record)))
    return found


def load_evaluation(predictor: Any) -> Evaluation | None:
    """The saved evaluation of the loaded model, or None when it has not been evaluated.

    The full metrics.json is used when it records the same checkpoint SHA-256 as the checkpoint's own summary (or,
    without a summary, as the checkpoint file); otherwise the checkpoint's summary is shown with a note saying why.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
    """
    path = _metrics_json_path(predictor)
    full = _read(str(path), path.stat().st_mtime_ns) if path.is_file() else None
    stored = getattr(predictor, "metrics", None) or None
    summary = _summary_record(stored)
    shas = {predictor.checkpoint_sha256, (stored or {}).get("checkpoint_sha256")} - {None}
    external = external_runs(predictor, shas)
    notes = []
    if isinstance(full, str):
        notes.append(f"The evaluation beside the checkpoint cannot be read ({full.split(': ', 1)[-1]}).")
        full = None
    if full is None:
        return Evaluation(summary, None, notes, external) if summary else None
    if summary is not None and full.checkpoint_sha256 != summary.checkpoint_sha256:
        return Evaluation(summary, path.parent, ["The evaluation folder beside the checkpoint comes from another "
                                                 "evaluation than the one stored in the checkpoint; showing the "
                                                 "checkpoint's own summary."], external)
    if summary is None and full.checkpoint_sha256 not in (None, predictor.checkpoint_sha256):
        return Evaluation(full, path.parent, ["This evaluation was computed for another checkpoint file; its "
                                              "numbers may not describe the loaded model. Evaluate again."], external)
    return Evaluation(full, path.parent, [], external)


def _summary_record(summary: Any) -> EvaluationRecord | None:
    """The record of the evaluation summary stored with the checkpoint, or None (none, or not readable)."""
    if not summary:
        return None
    try:
        return read_record({"metrics": {}, **summary}, "the checkpoint's evaluation summary")
    except CovidxrError:
        return None


def _covid_sets(evaluation: Evaluation, prefix: str) -> list[CovidSet]:
    """metrics.json's COVID-or-not sets whose name starts with ``prefix`` ("external ", "internal "), then those of
    the external evaluations found beside the checkpoint."""
    found = list(evaluation.record.covid_vs_rest.sets) if evaluation.record.covid_vs_rest else []
    if prefix == "external ":
        found += [s for run in evaluation.external_runs for s in (run.covid_vs_rest.sets if run.covid_vs_rest else [])]
    return [s for s in found if str(s.name or "").startswith(prefix) and ": " not in str(s.name)]


def _counts(covid_set: CovidSet, point: OperatingPoint) -> tuple[int, int, int, int] | None:
    """``(COVID films found, COVID films, other films called COVID, other films)`` of a set scored at ``point``'s
    threshold, or None when it was scored at another one or lacks a number."""
    threshold = covid_set.threshold
    sens = covid_set.sensitivity.estimate if covid_set.sensitivity else None
    spec = covid_set.specificity.estimate if covid_set.specificity else None
    positives, negatives = covid_set.n_positive, covid_set.n_negative
    if point.threshold is None or threshold is None or abs(threshold - point.threshold) > 1e-6:
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (sens, spec)) or not positives or \
            not negatives:
        return None
    return round(sens * positives), int(positives), round((1 - spec) * negatives), int(negatives)


def _one_collection(evaluation: Evaluation, covid_set: CovidSet, positive: str) -> bool:
    """Whether the COVID films of an external COVID-or-not set all come from one collection that gives no other
    class (its test set's per-source class counts say so)."""
    name = str(covid_set.name or "").removeprefix("external ")
    sets = [s for s in evaluation.external if s.name == name] or (
        evaluation.external if len(evaluation.external) == 1 else [])
    for test_set in sets:
        with_covid = [g.class_counts for g in (test_set.by_source or {}).values()
                      if g.class_counts and g.class_counts.get(positive)]
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
