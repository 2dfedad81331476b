"""The first sections of report.html: external validation (each ``--external`` folder) and the cross-validation by
source, or a plain statement that the run has none. The internal test split comes after them."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from covidxr.evaluation.heldout import present_classes, recall_interval, summary_columns, summary_row
from covidxr.evaluation.records import CovidVsRest, EvaluationRecord, ExternalSet, GroupMetrics, LungShare, record_json
from covidxr.evaluation.results import per_class_rows
from covidxr.html_page import Section, kv_html, paragraph_html, table_html
from covidxr.sources_display import source_name

NO_EXTERNAL = ("No external result: this run has only been evaluated on data from the hospitals it was trained on. "
               "How it does elsewhere is unknown; evaluate it with --external DIR on images from other hospitals.")
SOURCE_BASELINE_NOTE = ("A source-only baseline cannot know a source it never saw: on external data and on a held-out "
                        "source it predicts the training prior for every image, so it is shown as n/a. The view-only "
                        "baseline (learned on the training images) is meaningful where the views were seen in "
                        "training.")


def group_table_html(title: str, groups: dict[str, GroupMetrics] | None, classes: Sequence[str]) -> str:
    """HTML table of the metrics by source or by view (empty string when None)."""
    if not groups:
        return ""
    rows = [{"group": g, **{k: getattr(v, k) for k in ("n", "small", "class_counts", "accuracy", "balanced_accuracy",
                                                       "roc_auc_macro")},
             **{f"sens_{c}": (v.per_class or {})[c].sensitivity for c in classes}} for g, v in groups.items()]
    columns = ["group", "n", ("small", "n < 30"), ("class_counts", "images per class"), "accuracy",
               ("balanced_accuracy", "balanced acc."), ("roc_auc_macro", "macro ROC-AUC"),
               *[(f"sens_{c}", f"sensitivity {c}") for c in classes]]
    return table_html(rows, columns, caption=title)


def _warnings_html(warnings: Sequence[str]) -> str:
    return "".join(f'<p style="color:#9c1f1f"><strong>Warning:</strong> {html.escape(str(w))}</p>' for w in warnings)


def lung_share_html(share: LungShare | None) -> str:
    """The Grad-CAM lung share of one split (metrics.json's ``lung_share``), or why it was not measured."""
    if share is None:
        return ""
    if share.mean is None:
        return paragraph_html(f"Grad-CAM mass inside the lungs: not measured ({share.note or ''}).")
    return kv_html({"mean": share.mean, "median": share.median, "images": share.n,
                    "heatmap": share.method, "lung mask": share.lung_model or ""},
                   caption="Share of the Grad-CAM mass inside the lungs (1.0: all on the lungs)")


def _external_detail(ext: ExternalSet, classes: Sequence[str]) -> str:
    """Per class, baselines, calibration and sources of one external folder."""
    as_json = record_json(ext)
    rows = [{"class": r["class"], "support": r["support"], "n_predicted": r["n_predicted"],
             "recall": recall_interval(as_json, r["class"]), "specificity": r["specificity"],
             "precision": r["precision"], "roc_auc": r["roc_auc"]} for r in per_class_rows(ext)]
    cal = ext.calibration
    baselines = [vars(b) for b in (ext.baselines or {}).values() if b]
    parts = [_warnings_html(ext.warnings),
             table_html(rows, ["class", "support", "n_predicted", ("recall", "recall (95% CI)"),
                               ("specificity", "specificity (95% CI)"), "precision", "roc_auc"],
                        caption=f"{ext.name}: per class ({ext.data})")]
    if baselines:
        parts.append(table_html(baselines, ["column", "learned_on", ("seen_share", "share of images with a value "
                                            "seen in training"), "accuracy", "balanced_accuracy", "roc_auc_macro"],
                                caption="Metadata-only baselines"))
    if cal is not None:
        parts.append(kv_html({"temperature": cal.temperature, "how": cal.how,
                              "ECE before / after": f"{cal.ece_before:.3f} / {cal.ece_after:.3f}",
                              "Brier before / after": f"{cal.brier_before:.3f} / {cal.brier_after:.3f}",
                              "measured on": cal.measured_on}, caption="Calibration on this folder"))
    parts.append(group_table_html("Metrics by data source", ext.by_source, classes))
    parts.append(lung_share_html(ext.lung_share))
    return "\n".join(p for p in parts if p)


def covid_vs_rest_html(block: CovidVsRest | None) -> str:
    """The COVID-or-not table (metrics.json's ``covid_vs_rest``): AUC, and sensitivity and specificity at the one
    threshold fixed before testing, for every set of films; empty without a COVID class."""
    if block is None:
        return ""
    rows = [{"name": s.name, "covid": s.n_positive, "other": s.n_negative, "auc": s.auc,
             "sensitivity": s.sensitivity if s.threshold is not None else "n/a (AUC only)",
             "specificity": s.specificity if s.threshold is not None else "n/a (AUC only)"}
            for s in block.sets]
    threshold = "none" if block.threshold is None else f"{block.threshold:.3f}"
    text = (f"COVID or not: the probability of {block.positive!r} against every other class. Threshold "
            f"{threshold}, chosen by {block.chosen_on} before any of these films was scored, then applied "
            "unchanged. A held-out source's folds report AUC only (their threshold would have to be chosen on them). "
            "The siim rows (both classes from the same hospitals) are the cleanest measure of the disease signal.")
    return paragraph_html(text) + table_html(rows, ["name", ("covid", "COVID films"), ("other", "other films"),
                                                    ("auc", "AUC (95% CI)"), ("sensitivity", "sensitivity (95% CI)"),
                                                    ("specificity", "specificity (95% CI)")],
                                             caption="COVID vs rest")


def absent_class_text(externals: Sequence[ExternalSet]) -> str:
    """What the classes a folder lacks took: e.g. '98 of 199 films called pneumonia, which external has none of'."""
    parts = [f"{e.name}: {n} of {e.n_images} films called {c!r}, a class it has none of"
             for e in externals for c, n in (e.absent_class_calls or {}).items() if n]
    return paragraph_html("Three-class decisions on folders without every class: " + "; ".join(parts) + ".") \
        if parts else ""


def external_sections(result: EvaluationRecord) -> list[Section]:
    """The external validation section(s), always first in the report (a statement when there is none)."""
    classes = result.classes or []
    externals = result.external
    if not externals:
        if result.data_is_external:
            text = (f"The evaluated dataset ({result.data}) is external to the run: its metrics follow below. "
                    "For the internal test split and external folders in one report, use --external DIR.")
        else:
            text = NO_EXTERNAL
        return [Section("External validation", paragraph_html(text), anchor="external")]
    rows = [summary_row(record_json(e), classes) for e in externals]
    how = result.calibration.how if result.calibration else None
    intro = paragraph_html("Images from hospitals that appear nowhere in the training data. Nothing was fitted, "
                           "tuned or chosen on them: the temperature (" + str(how) + ") and the "
                           "thresholds were fixed before. Intervals: 95% patient-bootstrap. " + SOURCE_BASELINE_NOTE)
    sections = [Section("External validation", intro + covid_vs_rest_html(result.covid_vs_rest)
                        + table_html(rows, summary_columns(classes, "external data"), caption="External datasets")
                        + absent_class_text(externals), anchor="external")]
    sections += [Section(f"External: {_set_name(e)}", _external_detail(e, classes)) for e in externals]
    return sections


def _set_name(external: ExternalSet) -> str:
    """An external set's heading name: its sources as datasets ("COVID-CXNet + chest X-ray teaching films"), else
    its folder's name."""
    sources = [s for s in external.by_source or {} if s not in ("(unknown)", "(missing)")]
    return " + ".join(dict.fromkeys(map(source_name, sources))) or str(external.name)


def crossval_section(crossval: dict[str, Any] | None, classes: Sequence[str]) -> Section:
    """The held-out-source table of ``python -m covidxr.crossval`` (or a sentence saying it was not run)."""
    title = "Held-out sources (cross-validation by source)"
    if not crossval:
        return Section(title, paragraph_html("No cross-validation by source for this run: python -m covidxr.crossval "
                                             "--by source --data DATA --out RUN/crossval trains without each source "
                                             "and tests on it."), anchor="crossval")
    folds = crossval["folds"]
    intro = (f"Each source with at least {crossval['min_images']} images was left out of training and tested on "
             f"({crossval['mode']} of {crossval['arch']} at {crossval['img_size']} px, seed {crossval['seed']}; "
             "a patient-level train/val split of the other sources). Probabilities are uncalibrated. "
             + SOURCE_BASELINE_NOTE)
    skipped = crossval.get("skipped_sources") or {}
    if skipped:
        intro += f" Too small to hold out: {', '.join(f'{s} ({n})' for s, n in skipped.items())}."
    notes = [f"{f['name']}: {w}" for f in folds for w in f.get("warnings") or []]
    return Section(title, paragraph_html(intro) + table_html([summary_row(f, classes) for f in folds],
                                                             summary_columns(classes, "held-out source"),
                                                             caption=crossval.get("file") or "crossval.json")
                   + _warnings_html(notes), anchor="crossval")


def headline_cards(result: EvaluationRecord) -> dict[str, Any]:
    """The cards at the top of the page: external results first, then the internal test split (labelled)."""
    cards: dict[str, Any] = {}
    for s in result.covid_vs_rest.sets if result.covid_vs_rest else []:
        if str(s.name).startswith("external") and s.auc is not None and s.auc.estimate is not None:
            cards[f"{s.name}: COVID-vs-rest AUC"] = s.auc
    for ext in result.external:
        name = ext.name if "external" in str(ext.name).lower() else f"external {ext.name}"
        ci = ext.ci.metrics if ext.ci else {}
        cards[f"{name}: balanced accuracy"] = ci.get("balanced_accuracy") or (ext.metrics and
                                                                              ext.metrics.balanced_accuracy)
        as_json = record_json(ext)
        for c in present_classes(as_json):
            cards[f"{name}: recall {c}"] = recall_interval(as_json, c)
    if not result.external and not result.data_is_external:
        cards["external validation"] = "none"
    label = "external" if result.data_is_external else "internal"
    ci = result.ci.metrics if result.ci else {}
    for name in ("balanced_accuracy", "roc_auc_macro"):
        cards[f"{label} {result.split}: {name.replace('_', ' ')}"] = ci.get(name) or getattr(result.metrics, name)
    return cards
