"""The dataset audit as a report: headings, paragraphs, lists and tables, rendered as Markdown or as an HTML page.

:func:`report_blocks` lays an :func:`covidxr.data.audit.audit` result out once; :func:`markdown_report` and
:func:`html_report` (through :mod:`covidxr.html_page`, the project's one HTML renderer) render the same blocks;
:func:`write_report` writes one of them plus ``audit.json``, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from covidxr.files import atomic_write_text
from covidxr.html_page import Section, paragraph_html, render_html, table_html

REPORT_ROWS = 50
"""At most this many rows of each list are shown in the rendered report (all are in ``audit.json``)."""

SUSPICIOUS_TITLES = {"color": "Colour images", "tiny": "Tiny images", "view": "Not a frontal (PA/AP) view",
                     "modality": "DICOM modality other than CR/DX", "unreadable": "Unreadable files"}

Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"ul"|"table", content): a heading, a paragraph, a list or a DataFrame


def _pairs_frame(entries: list[dict[str, Any]], limit: int = REPORT_ROWS) -> pd.DataFrame:
    """One row per duplicate set: its images side by side, plus what it spans."""
    rows = []
    for e in entries[:limit]:
        row = {"distance": e["distance"]} if "distance" in e else {"copies": len(e["images"])}
        row["images"] = "; ".join(f"{i['relpath']} ({i['label']}, {i['source']}"
                                  + (f", {i['split']})" if "split" in i else ")") for i in e["images"])
        row["spans"] = ", ".join(k.removeprefix("cross_") for k, v in e.items() if k.startswith("cross_") and v)
        rows.append(row)
    return pd.DataFrame(rows)


def _cross_frame(nested: dict[str, dict[str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(nested).T.fillna(0).astype(int)
    frame["total"] = frame.sum(axis=1)
    frame.loc["total"] = frame.sum(axis=0)
    return frame.reset_index(names="class")


def _probe_frame(probe: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for scope, r in [("all classes", probe["overall"]), *probe["per_class"].items()]:
        rows.append({"images of": scope, "ROC-AUC": "n/a" if r["auc"] is None else f"{r['auc']:.3f}",
                     "images": r["n_images"], "folds": r["folds"],
                     "sources": ", ".join(f"{k} {v}" for k, v in r["sources"].items()) or r.get("reason", "")})
    return pd.DataFrame(rows)


def _duplicate_blocks(result: dict[str, Any]) -> list[Block]:
    s = result["settings"]
    blocks: list[Block] = []
    for key, name, how in (("exact_duplicates", "Exact duplicates", "identical file bytes (SHA-256)"),
                           ("near_duplicates", "Near duplicates",
                            f"{s['hash']} within {s['near_duplicate_bits']} bits, byte-identical copies excluded")):
        entries = result[key]["groups" if key == "exact_duplicates" else "pairs"]
        summary = result[key]["summary"]
        blocks += [("h2", name),
                   ("p", f"{summary['total']} found ({how}); across splits {summary['cross_split']}, across sources "
                         f"{summary['cross_source']}, across classes {summary['cross_label']}, across patient ids "
                         f"{summary['cross_patient_id']}."),
                   ("table", _pairs_frame(entries))]
    return blocks


def report_blocks(result: dict[str, Any], title: str = "Dataset audit") -> list[Block]:
    """Lay out an audit result as a list of headings, paragraphs, lists and tables."""
    s, p = result["settings"], result["patients"]
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"{result['n_images']} images, {p['n_patients']} patients, classes: {', '.join(result['classes'])}; "
              f"sources: {', '.join(result['sources'])}."),
        ("h2", "Confounding"),
        ("ul", result["confounding"] or ["no class comes mostly from one source, and no source gives one class only"]),
        ("p", f"A warning is given when at least {s['confounding_share']:.0%} of a class comes from one source, or "
              "when a source contributes a single class."),
        ("h2", "Counts (images per class and source)"),
        ("table", _cross_frame(result["counts"]["class_by_source"])),
    ]
    if "class_by_split" in result["counts"]:
        blocks += [("h2", "Counts per split"), ("table", _cross_frame(result["counts"]["class_by_split"]))]
    blocks += [
        ("h2", "Patients"),
        ("table", pd.DataFrame({"class": list(p["per_class"]), "patients": list(p["per_class"].values())})),
        ("p", f"Images per patient: max {p['images_per_patient_max']}, mean {p['images_per_patient_mean']:.2f}. "
              f"Patients with images in several classes: {len(p['patients_in_several_classes'])}."),
        ("ul", result["notes"]),
        *_duplicate_blocks(result),
        ("h2", "Images that look wrong for the task"),
    ]
    suspicious = result["suspicious"]
    blocks.append(("ul", [f"{SUSPICIOUS_TITLES.get(kind, kind)}: {len(rows)}" for kind, rows in suspicious.items()]))
    blocks.append(("p", f"Tiny means a shorter side below {s['tiny_side']} px."))
    for kind, rows in suspicious.items():
        if rows:
            blocks += [("h2", f"{SUSPICIOUS_TITLES.get(kind, kind)} ({len(rows)})"),
                       ("table", pd.DataFrame(rows[:REPORT_ROWS]))]
    if result.get("probe"):
        probe = result["probe"]
        blocks += [
            ("h2", "Source probe"),
            ("p", f"Linear probe (logistic regression) on the pooled {probe['arch']} features of "
                  f"{probe['checkpoint']} at {probe['img_size']} px, cross-validated by patient, predicting the "
                  "source. 0.5 is chance. A high AUC within one class means the features carry a site signature "
                  "that a classifier can use instead of the disease."),
            ("table", _probe_frame(probe)),
        ]
    return blocks


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    head = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def markdown_report(blocks: list[Block]) -> str:
    """Return report blocks as Markdown."""
    parts = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            parts.append(("# " if kind == "h1" else "## ") + content)
        elif kind == "p":
            parts.append(content)
        elif kind == "ul" and content:
            parts.append("\n".join(f"- {item}" for item in content))
        elif kind == "table":
            parts.append(_md_table(content))
    return "\n\n".join(parts) + "\n"


def _html_fragment(kind: str, content: Any) -> str:
    if kind == "p":
        return paragraph_html(content)
    if kind == "ul":
        return "\n".join(paragraph_html(f"• {item}") for item in content)
    if content.empty:
        return paragraph_html("(none)")
    columns = [str(c) for c in content.columns]
    return table_html(content.set_axis(columns, axis=1).to_dict("records"), columns)


def html_report(blocks: list[Block]) -> str:
    """Return report blocks as a self-contained HTML page (:func:`covidxr.html_page.render_html`).

    The ``h1`` is the page title, paragraphs before the first ``h2`` its subtitle, each ``h2`` one section.
    """
    title, intro, sections = "Dataset audit", [], []
    heading, body = None, []
    for kind, content in [*blocks, ("h2", None)]:
        if kind == "h1":
            title = content
        elif kind == "h2":
            if heading is not None:
                sections.append(Section(heading, "\n".join(body)))
            heading, body = content, []
        elif heading is None and kind == "p":
            intro.append(content)
        elif heading is not None:
            body.append(_html_fragment(kind, content))
    return render_html(sections, title=title, subtitle=" ".join(intro) or None)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, fmt: str = "md",
                 title: str = "Dataset audit") -> Path:
    """Write ``audit.md`` or ``audit.html`` and ``audit.json`` into ``out_dir`` (atomically).

    Returns:
        The path of the rendered report.

    Raises:
        ValueError: ``fmt`` is not ``md`` or ``html``.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"report format must be md or html, not {fmt!r}")
    out_dir = Path(out_dir)
    blocks = report_blocks(result, title)
    report = out_dir / f"audit.{fmt}"
    atomic_write_text(out_dir / "audit.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(report, markdown_report(blocks) if fmt == "md" else html_report(blocks))
    return report
