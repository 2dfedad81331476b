"""Tables of the "Model and evaluation" tab, built from a saved evaluation's record
(``covidxr.evaluation.results``) as display strings.

A section an older evaluation did not save is None in its record and gives "–" or no row, never an exception. The
cross-validation by source and the gate report stay JSON objects (their own files' content). Source names read as
datasets (:func:`covidxr.sources_display.source_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from app.format import interval, num, pct
from covidxr.evaluation.results import (
    CovidSet,
    EvaluationRecord,
    ExternalSet,
    GroupMetrics,
    ThresholdRow,
    per_class_rows,
)
from covidxr.sources_display import source_name

TestSet = EvaluationRecord | ExternalSet

UNSEEN = "n/a (never seen in training)"
BASELINE_LABELS = {"source": "Source only: knows nothing but which collection a film came from",
                   "view": "View only: knows nothing but the view position (PA, AP, ...)"}


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def headline(data: TestSet, key: str, fmt: Any = pct) -> str:
    """A headline metric (``balanced_accuracy``, ``roc_auc_macro``, ...) with its interval where saved."""
    ci = data.ci.metrics.get(key) if data.ci else None
    return interval(ci, fmt, getattr(data.metrics, key) if data.metrics else None)


def chance_level(data: TestSet) -> float | None:
    """The balanced accuracy of guessing: one over the number of classes present in the test set, or None."""
    present = [c for c, m in (data.metrics.per_class if data.metrics else {}).items() if m.support]
    return 1 / len(present) if present else None


def comparison_table(data: TestSet, model_label: str = "This model") -> pd.DataFrame:
    """The model's balanced accuracy and macro ROC-AUC beside the chance level and the source-only and metadata-only
    baselines."""
    rows = [{"Classifier": model_label, "Balanced accuracy": headline(data, "balanced_accuracy"),
             "Macro ROC-AUC": headline(data, "roc_auc_macro", num)}]
    chance = chance_level(data)
    if chance is not None:
        rows.append({"Classifier": "Chance: a guess without looking at the film", "Balanced accuracy": pct(chance),
                     "Macro ROC-AUC": num(0.5)})
    for column, baseline in (data.baselines or {}).items():
        if baseline is not None:
            label = BASELINE_LABELS.get(str(column), f"Metadata only: {column}")
            unseen = baseline.seen_share == 0  # every value new to it: it can only guess the class prior
            rows.append({"Classifier": label,
                         "Balanced accuracy": UNSEEN if unseen else pct(baseline.balanced_accuracy),
                         "Macro ROC-AUC": UNSEEN if unseen else num(baseline.roc_auc_macro)})
    return pd.DataFrame(rows)


def has_baselines(data: TestSet) -> bool:
    """Whether the evaluation saved at least one metadata-only baseline."""
    return any(b is not None for b in (data.baselines or {}).values())


def per_class_table(data: TestSet, images_label: str = "Test images") -> pd.DataFrame:
    """One row per class (``covidxr.evaluation.results.per_class_rows``) in words: images, sensitivity (recall) and
    specificity with intervals, PPV, NPV, ROC-AUC."""
    return pd.DataFrame([{"Class": row["class"], images_label: row["support"],
                          "Sensitivity (95% CI)": interval(row["sensitivity"], pct),
                          "Specificity (95% CI)": interval(row["specificity"], pct),
                          "PPV": pct(row["precision"]), "NPV": pct(row["npv"]), "ROC-AUC": num(row["roc_auc"])}
                         for row in per_class_rows(data)])


def held_out_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A cross-validation entry in one shape: ``{"held_out", "n_images", "n_patients", "balanced_accuracy",
    "roc_auc_macro", "recall": {class: interval}, "source_only"}``, from a ``folds`` entry (metrics and intervals of
    a held-out result) or a summary ``rows`` entry (intervals already)."""
    if "metrics" not in row:
        return {**row, "source_only": _get(row, "source_only_on_val", "balanced_accuracy")}
    present = [c for c, m in (_get(row, "metrics", "per_class") or {}).items() if isinstance(m, Mapping)
               and m.get("support")]
    point = {k: {"estimate": _get(row, "metrics", k)} for k in ("balanced_accuracy", "roc_auc_macro")}
    return {"held_out": row.get("name"), "n_images": row.get("n_images"), "n_patients": row.get("n_patients"),
            "chance": 1 / len(present) if present else None,
            **{k: _get(row, "ci", "metrics", k) or point[k] for k in point},
            "recall": {c: _get(row, "ci", "per_class", c, "sensitivity")
                       or {"estimate": _get(row, "metrics", "per_class", c, "recall")} for c in present},
            "source_only": _get(row, "source_only_on_val", "balanced_accuracy")}


def crossval_table(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per source left out of training: images, patients, balanced accuracy beside its chance level, macro
    ROC-AUC, recall of each class present (with intervals), and how well the source alone told the classes apart
    among the sources the model did learn from."""
    rows = [held_out_row(r) for r in rows]
    classes = list(dict.fromkeys(c for row in rows for c in (row.get("recall") or {})))
    table = []
    for row in rows:
        recall = row.get("recall") or {}
        chance = row.get("chance") or (1 / len(recall) if recall else None)
        line = {"Source left out of training": source_name(row.get("held_out")), "Images": row.get("n_images"),
                "Patients": row.get("n_patients"),
                "Balanced accuracy": interval(row.get("balanced_accuracy"), pct),
                "Chance level": pct(chance) if chance else "–",
                "Macro ROC-AUC": interval(row.get("roc_auc_macro"), num)}
        line |= {f"Recall {c}": interval(recall[c], pct) if c in recall else "no such films" for c in classes}
        line["Source alone, on the sources learned from"] = pct(row.get("source_only"))
        table.append(line)
    return pd.DataFrame(table)


GATE_SETS = {"rotated 90": "Test films turned 90°", "rotated 180": "Test films turned 180°",
             "rotated 270": "Test films turned 270°", "inverted": "Test films inverted (negatives)"}
GATE_FOLDERS = {"ct": "CT slices", "lateral": "Side (lateral) views"}
GATE_REASONS = {"colour": "colour picture", "size": "too small", "dicom": "DICOM header", "rotated": "rotated",
                "inverted": "inverted", "lateral": "side view", "ct": "CT slice", "photo": "photograph",
                "document": "document", "ood": "too unlike the training films"}


def _gate_row(name: str, r: Mapping[str, Any]) -> dict[str, Any]:
    n = r.get("n") or 0
    refused, borderline = r.get("refused") or 0, r.get("borderline") or 0
    share = (lambda k: pct(k / n) + (f" ({k})" if 0 < k < n else "")) if n else (lambda k: "–")
    reasons = ", ".join(f"{GATE_REASONS.get(str(c), str(c))} {k}" for c, k in (r.get("checks") or {}).items())
    return {"Images": name, "n": n, "Passed": share(n - refused - borderline),
            "Unusual (shown, marked)": share(borderline), "Refused": share(refused), "Reasons given": reasons}


def gate_table(report: Mapping[str, Any], test_label: str = "Test films") -> pd.DataFrame:
    """The input gate's verdicts per set of an evaluation's ``gate`` report: the evaluated films (all, then by
    source), the turned and inverted copies, the made photographs and documents, the checked folders."""
    rows = [_gate_row(test_label, report["evaluated"])] if isinstance(report.get("evaluated"), Mapping) else []
    by_source = report.get("by_source") or {}
    if len(by_source) > 1:
        rows += [_gate_row(f"… from {source_name(s)}", r) for s, r in by_source.items() if isinstance(r, Mapping)]
    rows += [_gate_row(GATE_SETS.get(k, k), r) for k, r in (report.get("variants") or {}).items()]
    rows += [_gate_row(f"Made {k}", r) for k, r in (report.get("made") or {}).items()]
    for groups in (report.get("folders") or {}).values():
        rows += [_gate_row(_folder_label(k), r) for k, r in (groups or {}).items() if isinstance(r, Mapping)]
    return pd.DataFrame(rows)


def _folder_label(group: str) -> str:
    """A checked folder's group in words: ``ct (not fitted on)`` reads "CT slices (patients the gate never saw)"."""
    name, _, rest = group.partition(" ")
    name = GATE_FOLDERS.get(name, "Other images" if name == "." else name)
    return f"{name} (patients the gate never saw)" if rest == "(not fitted on)" else f"{name} {rest}".strip()


def confusion_table(data: EvaluationRecord) -> pd.DataFrame | None:
    """The confusion matrix with readable row and column names (rows: truth, columns: model output), or None."""
    matrix = data.metrics.confusion_matrix
    classes = data.classes or data.metrics.classes or list(data.metrics.per_class)
    if not matrix or len(matrix) != len(classes):
        return None
    return pd.DataFrame(matrix, index=[f"truly {c}" for c in classes], columns=[f"model: {c}" for c in classes])


def subgroup_table(groups: Mapping[str, GroupMetrics], name_of: Any = str) -> pd.DataFrame:
    """One row per subgroup (source or view): images, accuracy, balanced accuracy, ROC-AUC, whether it is small."""
    rows = [{"Group": name_of(name), "Images": g.n, "Accuracy": pct(g.accuracy),
             "Balanced accuracy": pct(g.balanced_accuracy), "Macro ROC-AUC": num(g.roc_auc_macro),
             "Too small to judge": "yes" if g.small else ""} for name, g in groups.items()]
    return pd.DataFrame(rows)


def operating_points_table(points: list[ThresholdRow]) -> pd.DataFrame:
    """Thresholds chosen on validation for target sensitivities, and what they gave on the test images."""
    return pd.DataFrame([{"Target sensitivity": pct(p.target_sensitivity), "Threshold": num(p.threshold),
                          "Test sensitivity": pct(p.test_sensitivity),
                          "Test specificity": pct(p.test_specificity), "Note": p.reason or ""} for p in points])


def covid_set_name(name: str, external_names: Mapping[str, str] | None = None) -> str:
    """A plain name for a set of metrics.json's ``covid_vs_rest`` (no raw source strings, no folder names).

    Args:
        name: the set's recorded name ("internal test", "held out: SOURCE", "external FOLDER").
        external_names: the external folder's recorded name -> its datasets' names.
    """
    if name.startswith("internal ") and ": " in name:
        return f"Internal test, {source_name(name.split(': ', 1)[1])} only"
    if name.startswith("internal "):
        return "Internal test films (same sources as training)"
    if name.startswith("held out: "):
        return f"{source_name(name[len('held out: '):])}, left out of training"
    folder = name.removeprefix("external ")
    return f"Never seen in training: {(external_names or {}).get(folder, source_name(folder))}"


def _count(n: int | None) -> Any:
    return "?" if n is None else n


def covid_table(sets: list[CovidSet], external_names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """COVID or not, per set of films: counts, AUC, and sensitivity and specificity at the shipped threshold ("–"
    where the set was scored by a model of its own, without that threshold: the held-out sources)."""
    rows = []
    for s in sets:
        fixed = s.threshold is not None
        rows.append({"Films": covid_set_name(str(s.name or ""), external_names),
                     "COVID / other": f"{_count(s.n_positive)} / {_count(s.n_negative)}",
                     "AUC (chance 0.50)": interval(s.auc, num),
                     "Sensitivity": interval(s.sensitivity, pct) if fixed else "–",
                     "Specificity": interval(s.specificity, pct) if fixed else "–"})
    return pd.DataFrame(rows)


def key_value_table(values: Mapping[str, Any]) -> pd.DataFrame:
    """A two-column table of settings (no raw JSON on the page): nested values flattened to ``a.b`` keys."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            rows.append((prefix, text))

    walk("", values)
    return pd.DataFrame(rows, columns=["Setting", "Value"])


def counts_table(counts: Mapping[str, Any], rename_rows: bool = False) -> pd.DataFrame:
    """A table of counts (``{column: {row: n}}``) with zeros for gaps; source rows renamed when asked."""
    table = pd.DataFrame(counts).fillna(0).astype(int)
    if rename_rows:
        table.index = [source_name(i) for i in table.index]
    return table
