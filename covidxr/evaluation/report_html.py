"""Figures and a self-contained HTML report for model evaluation.

Generic building blocks: the module renders what it is given and knows nothing about models or datasets.

* Plot functions return ``matplotlib.figure.Figure`` objects built without ``pyplot`` (no global figure registry,
  no backend selection); ``figure_png`` / ``save_figure`` render them with matplotlib's Agg canvas.
* ``table_html``, ``kv_html``, ``paragraph_html`` and ``img_html`` make HTML fragments with every value escaped;
  ``render_html`` assembles ``Section`` objects into one HTML page with inline CSS, no scripts and no external URLs.
* ``write_text_atomic`` / ``write_bytes_atomic`` write through a temporary file in the target folder and
  ``os.replace``, so readers never see a half-written file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

from covidxr.evaluation.metrics import expected_calibration_error, reliability_bins
from covidxr.files import atomic_write_bytes as write_bytes_atomic
from covidxr.files import atomic_write_text as write_text_atomic

__all__ = [
    "Section",
    "figure_png",
    "format_value",
    "img_html",
    "kv_html",
    "paragraph_html",
    "plot_confusion_matrix",
    "plot_history",
    "plot_pr_curves",
    "plot_reliability",
    "plot_roc_curves",
    "render_html",
    "save_figure",
    "table_html",
    "write_bytes_atomic",
    "write_text_atomic",
]

_DPI = 110
_MISSING = "n/a"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330; background: #fff;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; line-height: 1.45; }
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
figure img { max-width: 100%; height: auto; border: 1px solid #eef0f4; }
figcaption { font-size: 0.88rem; color: #5a6275; }
"""


# --------------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------------


def figure_png(fig: Figure, dpi: int = _DPI) -> bytes:
    """Render a figure to PNG bytes in memory.

    Args:
        fig: The figure.
        dpi: Resolution.

    Returns:
        The PNG file content.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = _DPI) -> bytes:
    """Render a figure to PNG, write it atomically to ``path`` and return the bytes (e.g. for ``img_html``).

    Args:
        fig: The figure.
        path: Destination ``.png`` file.
        dpi: Resolution.

    Returns:
        The PNG file content that was written.
    """
    data = figure_png(fig, dpi)
    write_bytes_atomic(path, data)
    return data


# --------------------------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------------------------


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], normalize: bool) -> Figure:
    """Confusion-matrix heat map (rows = true class, columns = predicted class).

    Args:
        cm: ``C x C`` counts, e.g. ``classification_metrics(...)["confusion_matrix"]``.
        classes: ``C`` class names.
        normalize: If ``True``, show each row as fractions of its true class (recall on the diagonal; a class with
            no samples shows an empty row) and the count in brackets.

    Returns:
        The figure.
    """
    counts = np.asarray(cm, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"cm must be {n}x{n} for {n} classes, got shape {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(row_sums > 0, counts / row_sums, np.nan)
    else:
        shown = counts
    size = 2.2 + 0.9 * n
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(np.nanmax(shown)) if shown.size else 1.0, 1.0)
    image = ax.imshow(np.nan_to_num(shown, nan=0.0), cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n):
        for j in range(n):
            value = shown[i, j]
            if normalize:
                text = "–" if math.isnan(value) else f"{value:.2f}\n({int(counts[i, j])})"
            else:
                text = f"{int(counts[i, j])}"
            dark = not math.isnan(value) and value > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(n), labels=list(classes), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    return fig


def _one_vs_rest(y_true: Any, probs: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities for per-class curves.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        n_classes: ``C``.

    Returns:
        ``(labels as int array, probabilities as float array)``.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], n_classes):
        raise ValueError(f"probs must have shape ({y.shape[0]}, {n_classes}), got {p.shape}")
    return y, p


def _finish_curves(ax, title: str, xlabel: str, ylabel: str, legend_loc: str) -> None:
    # After sklearn's displays, which label the axes with their own wording.
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc=legend_loc, fontsize=8)
    ax.grid(alpha=0.3)


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve per class (sklearn's ``RocCurveDisplay``), AUC and positives in the legend.

    A class without positives or negatives has no curve and is listed in the legend as undefined.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        classes: ``C`` class names.

    Returns:
        The figure.
    """
    y, p = _one_vs_rest(y_true, probs, len(classes))
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    for k, name in enumerate(classes):
        positives = y == k
        if positives.all() or not positives.any():
            ax.plot([], [], label=f"{name} (AUC undefined: n_pos={int(positives.sum())})")
            continue
        display = RocCurveDisplay.from_predictions(positives, p[:, k], ax=ax, curve_kwargs={"lw": 1.6})
        display.line_.set_label(f"{name} (AUC {display.roc_auc:.3f}, n={int(positives.sum())})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    _finish_curves(ax, "ROC curves (one-vs-rest)", "False positive rate (1 - specificity)",
                   "True positive rate (sensitivity)", "lower right")
    return fig


def plot_pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Figure:
    """One-vs-rest precision-recall curve per class (sklearn's ``PrecisionRecallDisplay``), average precision and
    prevalence in the legend.

    The dotted horizontal line of each class's colour is its prevalence (the AP of a random classifier).

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Probabilities, shape ``(N, C)``.
        classes: ``C`` class names.

    Returns:
        The figure.
    """
    y, p = _one_vs_rest(y_true, probs, len(classes))
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    for k, name in enumerate(classes):
        positives = y == k
        if not positives.any():
            ax.plot([], [], label=f"{name} (AP undefined: no positives)")
            continue
        prevalence = float(positives.mean())
        display = PrecisionRecallDisplay.from_predictions(positives, p[:, k], ax=ax, curve_kwargs={"lw": 1.6})
        display.line_.set_label(f"{name} (AP {display.average_precision:.3f}, prev. {prevalence:.2f})")
        ax.axhline(prevalence, ls=":", lw=0.8, color=display.line_.get_color())
    _finish_curves(ax, "Precision-recall curves (one-vs-rest)", "Recall (sensitivity)", "Precision (PPV)",
                   "lower left")
    return fig


def plot_reliability(
    y_true: np.ndarray, probs: np.ndarray, probs_calibrated: np.ndarray | None = None, n_bins: int = 15
) -> Figure:
    """Reliability diagram of the top-class confidence, optionally before and after calibration on one plot.

    The upper panel shows bin accuracy against mean bin confidence (points only for non-empty bins; the diagonal is
    perfect calibration) with the ECE in the legend; the lower panel shows how many samples fall in each bin.

    Args:
        y_true: Labels, shape ``(N,)``.
        probs: Uncalibrated probabilities, shape ``(N, C)``.
        probs_calibrated: Probabilities after calibration (e.g. temperature scaling), same shape, or ``None``.
        n_bins: Number of equal-width confidence bins.

    Returns:
        The figure.
    """
    series = [("uncalibrated" if probs_calibrated is not None else "model", probs)]
    if probs_calibrated is not None:
        series.append(("temperature-scaled", probs_calibrated))
    fig = Figure(figsize=(5.5, 6.0))
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    ax_hist = fig.add_subplot(grid[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    width = 1.0 / n_bins / len(series)
    for i, (label, p) in enumerate(series):
        bins = reliability_bins(y_true, p, n_bins)
        ece = expected_calibration_error(y_true, p, n_bins)
        used = [b for b in bins if b["count"]]
        ax.plot(
            [b["confidence"] for b in used],
            [b["accuracy"] for b in used],
            marker="o",
            ms=4,
            lw=1.4,
            label=f"{label} (ECE {ece:.3f})",
        )
        ax_hist.bar([b["lo"] + (i + 0.5) * width for b in bins], [b["count"] for b in bins], width=width, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("Accuracy in bin")
    ax.set_title("Reliability diagram (top-class confidence)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)
    ax_hist.set_xlabel("Confidence")
    ax_hist.set_ylabel("Count")
    ax_hist.grid(alpha=0.3)
    return fig


def _history_rows(history: Any) -> list[dict[str, Any]]:
    """Normalise a training history to a list of dicts.

    Args:
        history: A list of per-epoch dicts or a pandas ``DataFrame`` (anything with ``to_dict("records")``).

    Returns:
        A list of dicts.
    """
    if hasattr(history, "to_dict"):
        return list(history.to_dict("records"))
    return [dict(row) for row in history]


def _numeric(value: Any) -> float:
    """A value as float, NaN when missing or not numeric.

    Args:
        value: Anything.

    Returns:
        A float (possibly NaN).
    """
    if isinstance(value, bool) or value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_history(history: Sequence[Mapping[str, Any]] | Any) -> Figure:
    """Training curves: one panel each for loss, AUC and accuracy, train and validation, whichever columns exist.

    Recognised columns: ``epoch`` (x axis; row number + 1 if absent), ``train_loss``, ``val_loss``, ``train_auc``,
    ``val_auc``, ``train_acc``, ``val_acc``. Missing values are skipped. With none of them, the figure says so.

    Args:
        history: A list of per-epoch dicts or a pandas ``DataFrame``.

    Returns:
        The figure.
    """
    rows = _history_rows(history)
    panels = [
        ("Loss", ("train_loss", "val_loss")),
        ("AUC", ("train_auc", "val_auc")),
        ("Accuracy", ("train_acc", "val_acc")),
    ]
    present = [
        (title, [c for c in cols if any(np.isfinite(_numeric(r.get(c))) for r in rows)]) for title, cols in panels
    ]
    present = [(title, cols) for title, cols in present if cols]
    fig = Figure(figsize=(4.2 * max(len(present), 1), 3.6))
    if not present:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training history recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    epochs = np.array([_numeric(r.get("epoch", i + 1)) for i, r in enumerate(rows)])
    for i, (title, cols) in enumerate(present):
        ax = fig.add_subplot(1, len(present), i + 1)
        for col in cols:
            values = np.array([_numeric(r.get(col)) for r in rows])
            ok = np.isfinite(values) & np.isfinite(epochs)
            ax.plot(epochs[ok], values[ok], marker="o", ms=3, lw=1.4, label=col.replace("_", " "))
        ax.set_xlabel("Epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
    """Whether a value is an interval dict with ``estimate``, ``lo`` and ``hi`` keys.

    Args:
        value: Anything.

    Returns:
        ``True`` for an interval dict.
    """
    return isinstance(value, Mapping) and {"estimate", "lo", "hi"} <= set(value)


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
    ``{"estimate", "lo", "hi"}`` -> ``"0.912 (0.871–0.946)"`` (``"0.912 (CI n/a)"`` without bounds); lists and tuples
    comma-separated; other mappings as ``key: value`` pairs; anything else ``str()``.

    Args:
        value: The value.
        digits: Decimals for floats.

    Returns:
        The text.
    """
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
        The ``<table>`` fragment.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    parts = ["<table>"]
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
    parts.append("</tbody></table>")
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
