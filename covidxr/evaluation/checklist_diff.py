"""What differs between the reporting checklists of evaluated runs: each run fact (:mod:`run_facts`) whose value is
not the same in every run, with the checklist items it fills; data, selection and thresholds first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from covidxr.evaluation.checklist import CHECKLISTS
from covidxr.evaluation.run_facts import run_facts

FIRST = ("data", "manifest", "exclusions", "split", "split_counts", "selection", "training", "thresholds",
         "calibration", "external")


def _items(fact: str) -> str:
    """The checklist items a fact fills, e.g. ``CLAIM 2024 7, 34; TRIPOD+AI 2024 5``."""
    parts = []
    for name, items in CHECKLISTS.items():
        numbers = [number for number, _, _, keys, _ in items if fact in keys]
        if numbers:
            parts.append(f"{name} {', '.join(numbers)}")
    return "; ".join(parts)


def fact_differences(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per checklist fact that differs between the runs' metrics.json contents.

    Args:
        runs: ``(name, metrics.json content)`` per run.

    Returns:
        Rows ``{"fact", "items", name: value per run}``, the facts of :data:`FIRST` first; a run whose metrics.json
        is too old to read its facts shows ``(not recorded)``.
    """
    facts = []
    for _, metrics in runs:
        try:
            facts.append(run_facts(metrics))
        except (KeyError, TypeError, ValueError):
            facts.append({})
    keys = [k for k in FIRST if any(k in f for f in facts)]
    keys += [k for f in facts for k in f if k not in keys]
    rows = []
    for key in dict.fromkeys(keys):
        values = [f.get(key) if f else "(not recorded)" for f in facts]
        if len({str(v) for v in values}) > 1:
            rows.append({"fact": key, "items": _items(key),
                         **{name: v if v is not None else "(none)" for (name, _), v in zip(runs, values, strict=True)}})
    return rows


def differences_markdown(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """The differences as a Markdown table (a sentence when there is none)."""
    if not rows:
        return "The runs' checklist facts are identical.\n"
    lines = ["| fact | checklist items | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = [str(row[n]).replace("|", "\\|") for n in names]
        lines.append(f"| {row['fact']} | {row['items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
