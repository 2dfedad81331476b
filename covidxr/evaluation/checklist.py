"""The reporting checklists (CLAIM 2024, TRIPOD+AI 2024) filled from one evaluation: ``checklist.md``,
``checklist.html`` beside report.html, and the rows of the report's checklist section.

A row is ``filled`` when the run's facts answer the item, ``partly`` when they answer part of it and the author adds
the rest, and ``author`` when only the author can answer it ("author to complete: ...").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxr.evaluation.checklist_items import CLAIM, TRIPOD_AI, Item
from covidxr.evaluation.run_facts import Facts, run_facts
from covidxr.files import atomic_write_text
from covidxr.html_page import Section, paragraph_html, render_html, table_html

CHECKLISTS = {"CLAIM 2024": CLAIM, "TRIPOD+AI 2024": TRIPOD_AI}
COLUMNS = [("checklist", "checklist"), ("number", "#"), ("item", "item"), ("where", "where in the report"),
           ("status", "status"), ("value", "value from this run")]


def _row(checklist: str, item: Item, facts: Facts) -> dict[str, Any]:
    number, text, anchor, keys, author = item
    values = [facts[k] for k in keys if facts.get(k)]
    missing = [k for k in keys if not facts.get(k)]
    if not values:
        value, status = f"author to complete: {author or 'not known to this run (' + ', '.join(missing) + ')'}", \
            "author"
    else:
        value = "; ".join(values)
        gaps = ([author] if author else []) + ([f"not known to this run: {', '.join(missing)}"] if missing else [])
        status = "partly" if gaps else "filled"
        if gaps:
            value += f" | author to complete: {'; '.join(gaps)}"
    return {"checklist": checklist, "number": number, "item": text, "where": f"#{anchor}" if anchor else "",
            "status": status, "value": value}


def checklist_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per item of both checklists, filled from the metrics.json content ``result``."""
    facts = run_facts(result)
    return [_row(name, item, facts) for name, items in CHECKLISTS.items() for item in items]


def status_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"filled", "partly", "author"}`` counts of the rows."""
    counts = Counter(r["status"] for r in rows)
    return {k: int(counts.get(k, 0)) for k in ("filled", "partly", "author")}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def checklist_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """The checklist as a Markdown document (one table per checklist)."""
    counts = status_counts(rows)
    lines = [f"# Reporting checklist: {title}", "",
             f"Filled from the run: {counts['filled']}; partly: {counts['partly']}; author to complete: "
             f"{counts['author']}. Items are paraphrased; read the official checklists for their wording.", ""]
    for name in CHECKLISTS:
        lines += [f"## {name}", "", "| # | item | where in the report | status | value |", "|---|---|---|---|---|"]
        lines += [f"| {r['number']} | {_cell(r['item'])} | {('report.html' + r['where']) if r['where'] else ''} | "
                  f"{r['status']} | {_cell(r['value'])} |" for r in rows if r["checklist"] == name]
        lines.append("")
    return "\n".join(lines)


def checklist_body(rows: Sequence[Mapping[str, Any]]) -> str:
    """The checklist's HTML fragment (counts and one table per checklist) for report.html and checklist.html."""
    counts = status_counts(rows)
    parts = [paragraph_html(f"Filled from this run: {counts['filled']} items; partly filled: {counts['partly']}; "
                            f"author to complete: {counts['author']}. The items are short paraphrases of CLAIM 2024 "
                            "and TRIPOD+AI 2024; the 'where' column points to the section of report.html. The same "
                            "tables are in checklist.md and checklist.html.")]
    for name in CHECKLISTS:
        parts.append(table_html([r for r in rows if r["checklist"] == name], COLUMNS[1:], caption=name))
    return "\n".join(parts)


def write_checklist(out: Path, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write ``checklist.md`` and ``checklist.html`` into ``out``; return the rows."""
    rows = checklist_rows(result)
    title = f"{result['model_card']['model']['arch']} · {result['checkpoint']}"
    atomic_write_text(out / "checklist.md", checklist_markdown(rows, title) + "\n")
    atomic_write_text(out / "checklist.html", render_html([Section("Reporting checklist", checklist_body(rows),
                                                                   anchor="checklist")],
                                                          title="Reporting checklist", subtitle=title))
    return rows
