"""Evaluation figures: confusion matrix, ROC and PR curves, reliability diagram and training history.

Plot functions return ``matplotlib.figure.Figure`` objects built without ``pyplot`` (no global figure registry, no
backend selection); ``figure_png`` / ``save_figure`` render them with matplotlib's Agg canvas.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

from covidxr.evaluation.calibration import expected_calibration_error, reliability_bins
from covidxr.files import atomic_write_bytes

_DPI = 110

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
    atomic_write_bytes(path, data)
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
    """``(labels as int64, probabilities as float64)`` after checking that ``probs`` is ``(N, n_classes)``."""
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
    """A training history (per-epoch dicts, or anything with ``to_dict("records")`` such as a DataFrame) as dicts."""
    if hasattr(history, "to_dict"):
        return list(history.to_dict("records"))
    return [dict(row) for row in history]


def _numeric(value: Any) -> float:
    """A value as float, NaN when missing or not numeric."""
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


