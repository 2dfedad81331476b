"""The sections of report.html, built from metrics.json's record (:class:`~covidxr.evaluation.records.EvaluationRecord`)
and the rendered plots."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from covidxr.evaluation.gate_report import gate_html
from covidxr.evaluation.metrics import HEADLINE
from covidxr.evaluation.outputs import EXPLAIN_SUMMARY
from covidxr.evaluation.records import EvaluationRecord, OperatingPoints
from covidxr.evaluation.report_external import crossval_section, external_sections, group_table_html, headline_cards
from covidxr.evaluation.report_paper import publication_sections
from covidxr.evaluation.results import per_class_rows
from covidxr.html_page import Section, img_html, kv_html, paragraph_html, render_html, table_html


def _metric_rows(result: EvaluationRecord) -> list[dict[str, Any]]:
    """Rows of the headline table: calibrated value with interval, uncalibrated value."""
    ci = result.ci.metrics if result.ci else {}
    uncalibrated = result.metrics_uncalibrated
    rows = []
    for name in (*HEADLINE, "average_precision_macro", "f1_weighted", "cohen_kappa", "mcc", "brier", "log_loss",
                 "ece"):
        rows.append({"metric": name.replace("_", " "), "value": ci.get(name) or getattr(result.metrics, name),
                     "uncalibrated": getattr(uncalibrated, name) if uncalibrated else None})
    return rows


def _figure(plots: dict[str, tuple[str, bytes]], name: str, caption: str) -> str:
    """An embedded plot, or nothing when it was not made."""
    return img_html(plots[name][1], alt=name, caption=f"{caption} ({plots[name][0]})") if name in plots else ""


def _calibration_html(result: EvaluationRecord, plots: dict[str, tuple[str, bytes]]) -> str:
    """Calibration section: temperature, ECE and Brier score before and after, reliability diagram."""
    cal = result.calibration
    if cal is None or cal.temperature is None:
        return paragraph_html("No calibration recorded.") + _figure(plots, "reliability", "Reliability diagram")
    text = (f"Temperature scaling divides the logits by T = {cal.temperature:.3f} ({cal.how}). It changes "
            "confidence, not the predicted class of any image, so accuracy, sensitivity and specificity are unchanged; "
            "one-vs-rest ROC-AUC can move slightly because a class's probability is compared across images. ECE and "
            f"Brier score below are measured on the evaluated split ({result.split}).")
    return paragraph_html(text) + kv_html({k: getattr(cal, k) for k in ("temperature", "ece_before", "ece_after",
                                                                        "brier_before", "brier_after")}) + \
        _figure(plots, "reliability", "Reliability diagram before and after temperature scaling")


def _operating_html(ops: OperatingPoints | None) -> str:
    """Operating-point table, or a sentence saying why there is none."""
    if ops is None:
        return paragraph_html("No operating points: no positive class (pass --positive CLASS) or no validation "
                              "split and no thresholds stored in the checkpoint.")
    intro = paragraph_html(f"Positive class {ops.positive!r}; score: {ops.score}. Thresholds chosen on "
                           f"{ops.chosen_on} for the target sensitivity, then applied unchanged to the "
                           "evaluated split.")
    columns = ["target_sensitivity", "threshold", "val_sensitivity", "val_specificity", "test_sensitivity",
               "test_specificity", "test_counts", "reason"]
    return intro + table_html([vars(p) for p in ops.points], columns, digits=3)


def _confounding_html(result: EvaluationRecord) -> str:
    """Baselines that see only a metadata column, and the breakdowns by source and by view."""
    parts = [paragraph_html("A 'classifier' that sees only the source (or the view) of an image, learned on the "
                            "run's training images. If it scores close to the model, the model's score says little "
                            "about the disease.")]
    baselines = [vars(b) for b in (result.baselines or {}).values() if b]
    if baselines:
        parts.append(table_html(baselines, ["column", "learned_on", "accuracy", "balanced_accuracy",
                                            "roc_auc_macro"], caption="Metadata-only baselines"))
    else:
        parts.append(paragraph_html("No metadata-only baseline: the run's split has no source/view information."))
    classes = result.classes or []
    parts.append(group_table_html("Metrics by data source", result.by_source, classes))
    parts.append(group_table_html("Metrics by view position", result.by_view, classes))
    if not result.by_source and not result.by_view:
        parts.append(paragraph_html("The dataset records no source or view: no breakdown possible."))
    return "\n".join(parts)


def _model_card_html(card: dict[str, Any], explain: list[dict[str, Any]] | None) -> str:
    """Model card section."""
    data = card["data"]
    split_rows = [{"split": s, **counts} for s, counts in data["split_counts"].items()]
    classes = card["model"]["classes"]
    source_rows = [{"class": c, "by source": counts} for c, counts in data["class_by_source"].items()]
    parts = [
        "<h3>Intended use</h3>", paragraph_html(card["intended_use"]),
        "<h3>Limitations</h3>",
        "<ul>" + "".join(f"<li>{html.escape(str(t))}</li>" for t in card["limitations"]) + "</ul>",
        "<h3>Data</h3>",
        kv_html({"training data": data["training_data"], "images": data["images"], "patients": data["patients"],
                 "patients per class": data["patients_per_class"], "evaluated dataset": data["evaluated"]["dataset"],
                 "external": data["evaluated"]["external"], "evaluated split": data["evaluated"]["split"]}),
        table_html(split_rows, ["split", *classes], caption="Images per split and class (run's data)"),
        table_html(source_rows, ["class", "by source"], caption="Images per class and source (run's data)"),
        *[paragraph_html(f"Warning: {w}") for w in data["confounding"]],
        "<h3>Architecture and training</h3>",
        kv_html({k: v for k, v in card["model"].items() if k not in ("training", "preprocess")}),
        kv_html(card["model"]["training"], caption="Training settings", digits=6),
        "<h3>Headline metrics (95% patient-bootstrap intervals)</h3>", kv_html(card["headline"]),
    ]
    if explain:
        parts += ["<h3>Explanations (Grad-CAM summary)</h3>",
                  table_html(explain, list(explain[0].keys()), caption=EXPLAIN_SUMMARY)]
    return "\n".join(parts)


def build_report(result: EvaluationRecord, plots: dict[str, tuple[str, bytes]], folder: Path | None = None) -> str:
    """Assemble the self-contained HTML report from metrics.json's record and the rendered plots (``folder``: the
    evaluation folder, whose failure-gallery pictures are embedded)."""
    warnings = "".join(f'<p style="color:#9c1f1f"><strong>Warning:</strong> {html.escape(str(w))}</p>'
                       for w in result.warnings) or paragraph_html("No warnings.")
    label = "External dataset" if result.data_is_external else "Internal"
    where = "same hospitals as training" if label == "Internal" else result.data
    caption = (f"{label} {result.split} split ({where}): {result.n_images} images, "
               f"{result.n_patients} patients")
    sections = [
        *external_sections(result),
        crossval_section(result.crossval, result.classes or []),
        Section("Warnings", warnings),
        Section(f"{label} {result.split} split: metrics",
                table_html(_metric_rows(result), ["metric", ("value", "value (95% CI)"), "uncalibrated"],
                           caption=caption)
                + table_html(per_class_rows(result), ["class", "support", "n_predicted", "sensitivity",
                                                       "specificity", "precision", "npv", "f1", "roc_auc",
                                                       "average_precision"], caption="Per class"),
                anchor="metrics"),
        Section("Confusion matrix", _figure(plots, "confusion_counts", "Counts")
                + _figure(plots, "confusion_normalized", "Row-normalised (recall on the diagonal)")),
        Section("ROC and precision-recall", _figure(plots, "roc", "ROC curves, one-vs-rest")
                + _figure(plots, "pr", "Precision-recall curves, one-vs-rest")),
        Section("Calibration", _calibration_html(result, plots)),
        Section("Operating points", _operating_html(result.operating_points)),
        Section("Confounding checks", _confounding_html(result)),
        Section("Input gate", gate_html(result.gate)),
        Section("Training", _figure(plots, "history", "Training curves (history.csv)")
                or paragraph_html("No training history recorded.")),
        Section("Model card", _model_card_html(result.model_card or {}, result.explain)),
        *publication_sections(result, _figure(plots, "decision_curve", "Decision curves, positive class vs the rest"),
                              folder),
    ]
    if result.unreadable:
        rows = [{"relpath": k, "reason": v} for k, v in result.unreadable.items()]
        sections.append(Section("Unreadable files", table_html(rows, ["relpath", "reason"])))
    reproducibility = result.reproducibility or {}
    sections.append(Section("Reproducibility", kv_html(reproducibility)))
    card = result.model_card or {}
    subtitle = (f"{(card.get('model') or {}).get('arch')} · {result.checkpoint} · {result.split} split of "
                f"{((card.get('data') or {}).get('evaluated') or {}).get('dataset')} · "
                f"{reproducibility.get('created')}")
    return render_html(sections, title="Chest X-ray classifier evaluation", subtitle=subtitle,
                       headline=headline_cards(result))
