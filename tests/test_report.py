"""Tests of covidxr.report: figures render to PNG, HTML is self-contained and escaped, writes are atomic."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr import html_page as h
from covidxr.evaluation import bootstrap
from covidxr.evaluation import metrics as m
from covidxr.evaluation import plots as r
from covidxr.files import atomic_write_text
from covidxr.utils import softmax

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["COVID-19", "<b>", "Normal"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    z = rng.normal(size=(90, 3))
    z[np.arange(90), y] += 2.0
    return y, softmax(z), softmax(z, 2.0)


def _png(fig) -> bytes:
    return r.figure_png(fig, dpi=40)


def _is_png(blob: bytes) -> bool:
    return blob.startswith(PNG_SIGNATURE) and len(blob) > 500


def test_confusion_matrix_figures(data):
    y, p, _ = data
    cm = m.classification_metrics(y, p, CLASSES)["confusion_matrix"]
    assert _is_png(_png(r.plot_confusion_matrix(cm, CLASSES, normalize=False)))
    # a class with no samples: the normalised row is empty, not a crash
    assert _is_png(_png(r.plot_confusion_matrix([[3, 1, 0], [0, 0, 0], [1, 0, 2]], CLASSES, normalize=True)))
    with pytest.raises(ValueError):
        r.plot_confusion_matrix([[1, 2], [3, 4]], CLASSES, normalize=False)


def test_curve_figures(data):
    y, p, p_cal = data
    assert _is_png(_png(r.plot_roc_curves(y, p, CLASSES)))
    assert _is_png(_png(r.plot_pr_curves(y, p, CLASSES)))
    assert _is_png(_png(r.plot_reliability(y, p)))
    assert _is_png(_png(r.plot_reliability(y, p, p_cal)))
    # a class absent from y_true does not break the curves
    y2 = np.where(y == 2, 0, y)
    assert _is_png(_png(r.plot_roc_curves(y2, p, CLASSES)))
    assert _is_png(_png(r.plot_pr_curves(y2, p, CLASSES)))


def test_history_figures():
    rows = [
        {"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_auc": 0.7},
        {"epoch": 2, "train_loss": 0.7, "val_loss": 0.9, "val_auc": 0.8},
        {"epoch": 3, "train_loss": 0.5, "val_loss": None, "val_auc": float("nan")},
    ]
    fig = r.plot_history(rows)
    assert len(fig.axes) == 2  # loss and AUC panels; no accuracy columns
    assert _is_png(_png(fig))
    frame = pd.DataFrame(rows).assign(train_acc=[0.5, 0.6, 0.7], val_acc=[0.5, 0.55, 0.6])
    fig = r.plot_history(frame)
    assert len(fig.axes) == 3
    assert _is_png(_png(fig))
    assert _is_png(_png(r.plot_history([])))


def test_save_figure_atomic(tmp_path, data):
    y, p, _ = data
    target = tmp_path / "plots" / "roc.png"
    blob = r.save_figure(r.plot_roc_curves(y, p, CLASSES), target)
    assert _is_png(blob)
    assert target.read_bytes() == blob
    assert [f.name for f in target.parent.iterdir()] == ["roc.png"]


def test_write_text_atomic(tmp_path):
    target = tmp_path / "report.html"
    atomic_write_text(target, "first ✓")
    atomic_write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [f.name for f in tmp_path.iterdir()] == ["report.html"]


def test_format_value_and_table():
    assert h.format_value({"estimate": 0.91234, "lo": 0.8712, "hi": 0.9456}) == "0.912 (0.871–0.946)"
    assert h.format_value({"estimate": 0.5, "lo": None, "hi": None}) == "0.500 (CI n/a)"
    assert h.format_value(None) == "n/a"
    assert h.format_value(float("nan")) == "n/a"
    assert h.format_value(np.float32(0.25)) == "0.250"
    assert h.format_value(12) == "12"
    assert h.format_value(True) == "yes"
    assert h.format_value(["a", 1.0]) == "a, 1.000"
    rows = [
        {"class": "<b>", "auc": {"estimate": 0.91234, "lo": 0.8712, "hi": 0.9456}, "n": 12},
        {"class": "Normal & co", "auc": None},
    ]
    table = h.table_html(rows, [("class", "Class"), ("auc", "ROC-AUC (95% CI)"), "n"], caption="Per <class>")
    assert "&lt;b&gt;" in table and "<b>" not in table
    assert "Normal &amp; co" in table
    assert "0.912 (0.871–0.946)" in table
    assert "Per &lt;class&gt;" in table
    assert table.count("<tr>") == 3
    assert "<td></td>" in table  # missing key -> empty cell
    assert "<td>n/a</td>" in table  # None -> n/a, left-aligned
    assert '<td class="num">12</td>' in table


def test_img_html_roundtrip():
    blob = PNG_SIGNATURE + b"fake"
    frag = h.img_html(blob, alt='ROC "curves" <all>', caption="Figure 1")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', frag)
    assert match and base64.b64decode(match.group(1)) == blob
    assert 'alt="ROC &quot;curves&quot; &lt;all&gt;"' in frag


def test_render_html_self_contained_and_escaped(data):
    y, p, p_cal = data
    metrics = m.classification_metrics(y, p, CLASSES)
    ci = bootstrap.bootstrap_ci(y, p, np.arange(y.size).astype(str), CLASSES, n_resamples=50)
    rows = [{"class": c, **metrics["per_class"][c]} for c in CLASSES]
    png = _png(r.plot_reliability(y, p, p_cal))
    sections = [
        h.Section("Model card", h.kv_html({"model": "densenet121 <test>", "classes": CLASSES})),
        h.Section("Per-class metrics", h.table_html(rows, ["class", "precision", "recall", "specificity"])),
        h.Section("Calibration", h.paragraph_html("Before & after") + h.img_html(png, "reliability diagram")),
        h.Section("Calibration", h.paragraph_html("duplicate title gets its own anchor")),
    ]
    page = h.render_html(
        sections,
        title="covidxr <report>",
        subtitle="run 1",
        headline={"ROC-AUC (macro)": ci["metrics"]["roc_auc_macro"], "Accuracy": ci["metrics"]["accuracy"]},
    )
    assert page.startswith("<!DOCTYPE html>")
    for title in ("Model card", "Per-class metrics", "Calibration"):
        assert f"<h2>{title}</h2>" in page
    assert "covidxr &lt;report&gt;" in page
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "densenet121 &lt;test&gt;" in page
    assert "Before &amp; after" in page
    assert "data:image/png;base64," in page
    assert "http" not in page.lower()
    assert "<script" not in page.lower()
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert len(ids) == 4 and len(set(ids)) == 4
    assert all(f'href="#{i}"' in page for i in ids)
    # headline cards come before the table of contents and show intervals
    auc = ci["metrics"]["roc_auc_macro"]
    assert page.index(h.format_value(auc)) < page.index('<nav class="toc">')


def test_report_does_not_use_pyplot():
    # pyplot holds global figure state and picks a GUI backend; the module must build Figure objects directly
    source = Path(r.__file__).read_text(encoding="utf-8")
    imports = [line.strip() for line in source.splitlines() if line.strip().startswith(("import ", "from "))]
    assert not [line for line in imports if "pyplot" in line]
    assert "matplotlib.use(" not in source
