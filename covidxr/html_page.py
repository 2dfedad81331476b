"""Self-contained HTML pages: escaped fragments (tables, key-value lists, paragraphs, images) and one page renderer.

Every report covidxr writes (evaluation, comparison, dataset audit, CAM scores) is assembled from ``Section`` objects
with these functions: values are escaped, the page has inline CSS, no scripts and no external URLs.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_MISSING = "n/a"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330; background: #fff;
       max-width: 1200px; margin: 2rem auto; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; border-bottom: 2px solid #d9dee8; padding-bottom: 0.2rem; margin-top: 2.2rem; }
p.subtitle { color: #5a6275; margin-top: 0; }
nav.toc { background: #f5f7fa; border: 1px solid #d9dee8; border-radius: 6px; padding: 0.6rem 1.2rem; }
nav.toc ol { margin: 0.3rem 0; padding-left: 1.3rem; }
nav.toc a { color: #1f4e9c; text-decoration: none; }
div.headline { display: flex; flex-wrap: wrap; gap: 0.8rem; margin: 1rem 0 1.4rem 0; }
div.card { border: 1px solid #d9dee8; border-radius: 6px; padding: 0.5rem 0.9rem; min-width: 10rem; }
div.card .label { font-size: 0.8rem; color: #5a6275; text-transform: uppercase; letter-spacing: 0.03em; }
div.card .value { font-size: 1.15rem; font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #d9dee8; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f7fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef0f4; box-sizing: border-box; }
figcaption { font-size: 0.88rem; color: #5a6275; }
div.scroll { max-width: 100%; overflow-x: auto; margin: 0.8rem 0; }
div.scroll > table { margin: 0; }
td { overflow-wrap: break-word; }
div.gallery { display: flex; flex-wrap: wrap; gap: 0.6rem; }
figure.thumb { width: 330px; margin: 0; }
figure.thumb figcaption { overflow-wrap: anywhere; }
figure.thumb img { width: 160px; height: auto; margin-right: 2px; vertical-align: top; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 10pt; }
  nav.toc { display: none; }
  h2, h3 { break-after: avoid; }
  table, tr, figure, div.card { break-inside: avoid; }
  thead { display: table-header-group; }
  div.scroll { overflow: visible; }
  table { font-size: 7.5pt; max-width: 100%; }
  th, td { padding: 0.1rem 0.25rem; overflow-wrap: anywhere; }
  td.num { white-space: normal; }
  figure { display: block; }
  figure img { max-width: 100%; }
  section { break-before: auto; }
}
"""




# --------------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One titled part of the report.

    Attributes:
        title: Plain-text heading (escaped when rendered).
        body_html: Trusted HTML fragment, e.g. built with ``table_html``, ``kv_html``, ``paragraph_html`` and
            ``img_html`` (which escape their inputs). It is inserted verbatim.
        anchor: Optional id for the table of contents; derived from the title when empty.
    """

    title: str
    body_html: str
    anchor: str = ""


def _is_interval(value: Any) -> bool:
    """Whether a value is an interval: a dict with ``estimate``, ``lo`` and ``hi`` keys, or a record with those fields.

    Args:
        value: Anything.

    Returns:
        ``True`` for an interval dict or record.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name for f in dataclasses.fields(value)}
    return isinstance(value, (Mapping, set)) and {"estimate", "lo", "hi"} <= set(value)


def _fmt_number(value: Any, digits: int) -> str:
    """Format one scalar.

    Args:
        value: ``None``, bool, int, float or anything else.
        digits: Decimals for floats.

    Returns:
        The text (not escaped).
    """
    if value is None:
        return _MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _MISSING if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def format_value(value: Any, digits: int = 3) -> str:
    """Format a value for display (unescaped text).

    ``None``/NaN -> ``"n/a"``; floats with ``digits`` decimals; ints as is; bools ``yes``/``no``; interval dicts
    ``{"estimate", "lo", "hi"}`` -> ``"0.912 (0.871–0.946)"`` (``"0.912 (CI n/a)"`` without bounds); a record (a
    dataclass instance, e.g. an interval of ``covidxr.evaluation.records``) as the mapping of its fields; lists and
    tuples comma-separated; other mappings as ``key: value`` pairs; anything else ``str()``.

    Args:
        value: The value.
        digits: Decimals for floats.

    Returns:
        The text.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if _is_interval(value):
        est = _fmt_number(value["estimate"], digits)
        if value["lo"] is None or value["hi"] is None:
            return f"{est} (CI {_MISSING})"
        return f"{est} ({_fmt_number(value['lo'], digits)}–{_fmt_number(value['hi'], digits)})"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {format_value(v, digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value)
    return _fmt_number(value, digits)


def _is_numeric_cell(value: Any) -> bool:
    """Whether a cell should be right-aligned.

    Args:
        value: Cell value.

    Returns:
        ``True`` for numbers and intervals.
    """
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, float, np.integer, np.floating)) or _is_interval(value)


def table_html(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    caption: str | None = None,
    digits: int = 3,
) -> str:
    """An HTML table of dict rows; every value is formatted with ``format_value`` and escaped.

    Args:
        rows: One mapping per row.
        columns: Column keys, each either ``"key"`` (header = key) or ``("key", "Header text")``. A key missing from
            a row gives an empty cell.
        caption: Optional table caption (escaped).
        digits: Decimals for floats.

    Returns:
        The ``<table>`` fragment, in a ``<div class="scroll">`` that scrolls a wide table inside the page.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    parts = ['<div class="scroll"><table>']
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for _, h in cols) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for key, _ in cols:
            if key not in row:
                cells.append("<td></td>")
                continue
            value = row[key]
            css = ' class="num"' if _is_numeric_cell(value) else ""
            cells.append(f"<td{css}>{html.escape(format_value(value, digits))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "\n".join(parts)


def kv_html(mapping: Mapping[str, Any], caption: str | None = None, digits: int = 3) -> str:
    """A two-column key/value table (model card, reproducibility record), escaped.

    Args:
        mapping: Keys and values (values formatted with ``format_value``).
        caption: Optional caption.
        digits: Decimals for floats.

    Returns:
        The ``<table>`` fragment.
    """
    rows = [{"key": str(k), "value": v} for k, v in mapping.items()]
    return table_html(rows, [("key", "Field"), ("value", "Value")], caption=caption, digits=digits)


def paragraph_html(text: str) -> str:
    """An escaped paragraph.

    Args:
        text: Plain text.

    Returns:
        ``<p>...</p>``.
    """
    return f"<p>{html.escape(text)}</p>"


def img_html(png_bytes: bytes, alt: str, caption: str | None = None) -> str:
    """Embed a PNG in the page as a base64 data URI.

    Args:
        png_bytes: PNG file content (e.g. from ``figure_png`` or ``save_figure``).
        alt: Alternative text (escaped).
        caption: Optional caption under the image (escaped).

    Returns:
        A ``<figure>`` fragment holding ``<img src="data:image/png;base64,..." alt="...">``.
    """
    data = base64.b64encode(png_bytes).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">{cap}</figure>'


def _slug(text: str, used: set[str]) -> str:
    """A unique HTML id derived from a title.

    Args:
        text: The title.
        used: Ids already taken (not modified).

    Returns:
        An id not in ``used``.
    """
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    return slug


def render_html(
    sections: Sequence[Section],
    title: str = "Evaluation report",
    subtitle: str | None = None,
    headline: Mapping[str, Any] | None = None,
) -> str:
    """Assemble a self-contained HTML page: title, headline numbers, table of contents, then the sections.

    The page has inline CSS only: no scripts, fonts, stylesheets or images from elsewhere.

    Args:
        sections: Report sections, in order.
        title: Page title (escaped).
        subtitle: Optional line under the title (escaped), e.g. model name and date.
        headline: Optional ``{label: value}`` shown as cards at the top; values go through ``format_value``, so
            interval dicts from ``bootstrap_ci`` show as ``"0.912 (0.871–0.946)"``.

    Returns:
        The HTML document.
    """
    used: set[str] = set()
    anchors = []
    for section in sections:
        anchor = section.anchor if section.anchor and section.anchor not in used else _slug(section.title, used)
        used.add(anchor)
        anchors.append(anchor)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        out.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    if headline:
        out.append('<div class="headline">')
        for label, value in headline.items():
            out.append(
                f'<div class="card"><div class="label">{html.escape(str(label))}</div>'
                f'<div class="value">{html.escape(format_value(value))}</div></div>'
            )
        out.append("</div>")
    if sections:
        out.append('<nav class="toc"><strong>Contents</strong><ol>')
        out.extend(
            f'<li><a href="#{html.escape(a, quote=True)}">{html.escape(s.title)}</a></li>'
            for s, a in zip(sections, anchors, strict=True)
        )
        out.append("</ol></nav>")
    for section, anchor in zip(sections, anchors, strict=True):
        out.append(f'<section id="{html.escape(anchor, quote=True)}">')
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        out.append(section.body_html)
        out.append("</section>")
    out.extend(["</body>", "</html>", ""])
    return "\n".join(out)
