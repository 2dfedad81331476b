"""The report's sections for a paper: the failure gallery, the subgroups, the clinical utility (decision curve) and
the reporting checklist."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidxr.evaluation.checklist import checklist_body
from covidxr.evaluation.records import EvaluationRecord
from covidxr.html_page import Section, format_value, paragraph_html, table_html


def _jpeg_html(folder: Path | None, name: str | None, alt: str) -> str:
    """An embedded JPEG of the evaluation folder, or a dash when there is none."""
    if folder is None or not name or not (folder / name).is_file():
        return "–"
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt, quote=True)}" loading="lazy">'


def _item_html(item: dict[str, Any], folder: Path | None) -> str:
    probs = ", ".join(f"{c} {p:.2f}" for c, p in item["probs"].items())
    share = f"; lung share {item['lung_share']:.2f}" if item.get("lung_share") is not None else ""
    caption = (f"{item['label']} → {item['predicted']} ({probs}{share}); {item['source'] or 'source n/a'}; "
               f"{item['relpath']}" + (f"; {item['note']}" if item.get("note") else ""))
    return (f'<figure class="thumb">{_jpeg_html(folder, item["thumbnail"], item["relpath"])}'
            f'{_jpeg_html(folder, item["gradcam"], "Grad-CAM " + item["relpath"])}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def gallery_section(extras: dict[str, Any], folder: Path | None) -> Section:
    """Most confident errors per class and set, then the errors by source and by answer."""
    parts = [paragraph_html("Per true class, the wrong predictions the model was most sure of (at most "
                            f"{(extras['gallery'] or [{}])[0].get('per_class', 0)} per class and set): the image, "
                            "then the Grad-CAM of the class it predicted. Pictures are in gallery/.")]
    if not extras.get("gallery"):
        parts.append(paragraph_html("No gallery (--gallery 0)."))
    for g in extras.get("gallery") or []:
        parts.append(f"<h3>{html.escape(g['name'])}: {g['n_errors']} errors in {g['n_images']} images</h3>")
        by_class: dict[str, list[str]] = {}
        for item in g["items"]:
            by_class.setdefault(item["true_class"], []).append(_item_html(item, folder))
        for cls, figures in by_class.items():
            parts.append(f'<h4>true class {html.escape(cls)}</h4><div class="gallery">{"".join(figures)}</div>')
        parts.append(table_html(g["groups"]["by_answer"], ["true class", "model said", "errors"],
                                caption="Errors by what the model said instead"))
        if g["groups"]["by_source"]:
            parts.append(table_html(g["groups"]["by_source"], ["source", "images", "errors", "error_rate"],
                                    caption="Errors by source"))
    return Section("Failure gallery", "\n".join(parts), anchor="failure-gallery")


def _subgroup_rows(groups: dict[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    return [{"group": v, "n": g["n"], "patients": g["patients"], "images per class": g["class_counts"],
             "auc": g["auc_vs_rest"], "small": g.get("flag", "too small" if g["small"] else ""),
             **{f"recall {c}": g["recall"][c] for c in classes}} for v, g in groups.items()]


def subgroups_section(extras: dict[str, Any], classes: Sequence[str]) -> Section:
    """Per set and metadata column: counts, recall per class and COVID-vs-rest AUC with intervals."""
    positive = extras.get("positive") or "positive"
    parts = [paragraph_html(f"Recall per class and {positive}-vs-rest ROC-AUC within each subgroup the metadata "
                            f"records (95% patient-bootstrap intervals). Flag rule: {extras['small_rule']}.")]
    columns = ["group", "n", "patients", "images per class", ("auc", f"{positive} vs rest ROC-AUC"),
               *[f"recall {c}" for c in classes], ("small", "flag")]
    for name, by_column in (extras.get("subgroups") or {}).items():
        for column, groups in by_column.items():
            parts.append(table_html(_subgroup_rows(groups, classes), columns, caption=f"{name}: by {column}"))
    if not any(extras.get("subgroups", {}).values()):
        parts.append(paragraph_html("No subgroup: the metadata records no sex, age, view or source with two values."))
    return Section("Subgroups", "\n".join(parts), anchor="subgroups")


def utility_section(extras: dict[str, Any], figure: str) -> Section:
    """The decision curve (figure and table) of each external folder."""
    curves = extras.get("decision_curves") or []
    if not curves:
        return Section("Clinical utility", paragraph_html("No decision curve: no positive class."),
                       anchor="clinical-utility")
    parts = [paragraph_html(f"Net benefit of treating as {extras['positive']} the images whose probability reaches "
                            "the threshold, against treating all and treating none (Vickers and Elkin 2006). The "
                            "threshold probability expresses how many unneeded treatments one needed treatment is "
                            "worth. The prevalence assumed is stated per set; change it with --prevalence P."), figure]
    for c in curves:
        if not c.get("curve"):
            parts.append(paragraph_html(f"{c['name']}: {c['note']}"))
            continue
        parts.append(table_html(c["table"], ["threshold", ("model", "net benefit: model"), ("treat_all", "treat all"),
                                             ("treat_none", "treat none"),
                                             ("model_minus_best_default", "model minus the better default")],
                                caption=f"{c['name']}: {c['n']} images, prevalence {format_value(c['prevalence'])} "
                                        f"({c['prevalence_from']}; observed {format_value(c['observed_prevalence'])})"))
    return Section("Clinical utility", "\n".join(parts), anchor="clinical-utility")


def publication_sections(result: EvaluationRecord, figure: str, folder: Path | None) -> list[Section]:
    """The gallery, subgroup, clinical-utility and checklist sections (nothing when the extras were not made)."""
    extras = result.publication
    sections = []
    if extras:
        sections += [gallery_section(extras, folder), subgroups_section(extras, result.classes or []),
                     utility_section(extras, figure)]
    if result.checklist:
        sections.append(Section("Reporting checklist", checklist_body(result.checklist), anchor="checklist"))
    return sections
