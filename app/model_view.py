"""The "Model and evaluation" tab: a plain summary that fits one screen, then the details, folded.

The summary says what the model was trained on, how its COVID answer did on films from hospitals it never saw (the
same line of natural frequencies each film's answer quotes, ``app.evaluation.reliability_line``), how it answers and
what it cannot do. The details, each in an expander, start with how to read the numbers, then results on films from
sources the model never saw (external validation, held-out-source cross-validation), the internal test (held-out
patients of the same sources, under its own heading), the input gate, training and the model's identity. Every
table has one sentence saying what it shows and whether the result is good, at chance or below chance. Numbers come
from the saved evaluation only (:mod:`app.evaluation`); nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st

from app.eval_tables import (
    chance_level,
    comparison_table,
    confusion_table,
    counts_table,
    covid_table,
    crossval_table,
    gate_table,
    has_baselines,
    held_out_row,
    key_value_table,
    operating_points_table,
    per_class_table,
    subgroup_table,
)
from app.evaluation import Evaluation, dataset_name, reliability_line
from app.format import num, pct
from app.model_texts import (
    CANNOT,
    EXPLANATIONS,
    NO_EXTERNAL,
    PLOT_CAPTIONS,
    crossval_how,
    judge,
    not_evaluated,
    single_class_sources,
    temperature_text,
)
from app.redact import public_report, setting_rows
from covidxr.evaluation.results import CovidSet, EvaluationRecord, ExternalSet, Interval
from covidxr.inference.decision import OperatingPoint
from covidxr.sources_display import readable, source_name


def _warning_list(title: str, items: list[Any], sources: Any = ()) -> None:
    """Several cautions in one warning box, recorded source names replaced by dataset names."""
    if items:
        text = "\n".join(f"- {readable(str(item), sources)}" for item in items)
        st.warning(f"**{title}**\n\n{text}", icon=":material/warning:")


def _sources(data: EvaluationRecord) -> set[str]:
    """Every recorded source name an evaluation mentions (its breakdown and its training data table)."""
    facts = (data.model_card or {}).get("data") or {}
    names = set(data.by_source or {})
    for table in (facts.get("class_by_source"), (facts.get("evaluated") or {}).get("class_by_source")):
        if isinstance(table, Mapping):
            names |= {s for counts in table.values() if isinstance(counts, Mapping) for s in counts}
    return names


def _headline_metrics(data: EvaluationRecord) -> None:
    """Balanced accuracy and macro ROC-AUC, accuracy and macro F1 as metric tiles, each interval below its tile."""
    shown = (("balanced_accuracy", "Balanced accuracy", pct, "average sensitivity over the classes"),
             ("roc_auc_macro", "Macro ROC-AUC", num, "ROC-AUC averaged over classes (0.5 chance, 1 perfect)"),
             ("accuracy", "Accuracy", pct, "share of all test images classified correctly"),
             ("f1_macro", "Macro F1", num, "balance of PPV and sensitivity, averaged over classes (0 to 1)"))
    cols = st.columns(len(shown))
    for col, (key, label, fmt, meaning) in zip(cols, shown, strict=True):
        estimate, lo, hi = _ci(data, key)
        col.metric(label, fmt(estimate), help=meaning)
        if lo is not None and hi is not None:
            col.caption(f"95% interval {fmt(lo)}–{fmt(hi)}")


def _table(frame: Any, caption: str | None = None) -> None:
    """A static table (wraps at narrow widths) without its index, with a caption."""
    if frame is not None and len(frame):
        st.table(frame, hide_index=True, alt=caption)
        if caption:
            st.caption(caption)


def _ci(data: EvaluationRecord | ExternalSet, key: str) -> tuple[Any, Any, Any]:
    """``(estimate, lo, hi)`` of a headline metric (balanced accuracy, macro ROC-AUC)."""
    ci = data.ci.metrics.get(key) if data.ci else None
    if ci is not None:
        return ci.estimate, ci.lo, ci.hi
    return (getattr(data.metrics, key) if data.metrics else None), None, None


def comparison_sentence(data: EvaluationRecord | ExternalSet, where: str) -> str:
    """What a comparison table shows and how the model did against chance there."""
    estimate, lo, hi = _ci(data, "balanced_accuracy")
    chance = chance_level(data) or 0.5
    verdict = judge(estimate, chance, lo, hi, good=0.8)
    return (f"This model {where} beside a guess and beside classifiers that see only metadata (learned on the "
            f"training split). Its balanced accuracy, {pct(estimate)} against a chance level of {pct(chance)}, is "
            f"**{verdict}**. A metadata-only classifier far above chance means the films can be told apart by their "
            "source or view alone; one below chance (an AUC under 0.50) points the wrong way on these films.")


def _render_external(test_set: ExternalSet) -> None:
    """One external test set: size, headline with intervals, per-class recall and AUC, baselines, calibration."""
    name = dataset_name(test_set)
    n_images = "?" if test_set.n_images is None else test_set.n_images
    patients = f", {test_set.n_patients} patients" if test_set.n_patients else ""
    st.markdown(f"#### External validation: {name}")
    st.markdown(f"**{n_images} images{patients}** from sources the model never saw in "
                "training, validation or model selection.")
    _warning_list("Caution about these numbers", list(test_set.warnings), set(test_set.by_source or {}))
    single = single_class_sources(test_set)
    if single:
        st.warning(f"**Caution:** {', '.join(source_name(s) for s in single)} "
                   f"{'gives' if len(single) == 1 else 'each give'} films of a single class here, so on "
                   f"{'it' if len(single) == 1 else 'them'} these numbers cannot tell recognising the disease from "
                   "recognising the source.", icon=":material/warning:")
    _table(comparison_table(test_set), comparison_sentence(test_set, "on these films"))
    table = per_class_table(test_set, "Images")
    absent = [str(c) for c, n in zip(table.get("Class", []), table.get("Images", []), strict=True) if not n]
    _table(table[[bool(n) for n in table["Images"]]] if absent else table,
           "Per class on these films, when the model names its most likely class (95% intervals in brackets); the "
           "page's COVID answer uses the threshold instead, and its figures are in the COVID-or-not table above."
           + (f" No {', '.join(absent)} films in this set, so nothing is measured for that class." if absent else ""))
    took = {c: n for c, n in (test_set.absent_class_calls or {}).items() if n}
    if took:
        st.markdown("**Answers of a class this set does not have:** " + "; ".join(
            f"{n} of {n_images} films were called {c}" for c, n in took.items())
            + ". The COVID-or-not table above does not depend on them.")
    ece = test_set.calibration.ece_after if test_set.calibration else None
    ece = ece if ece is not None else (test_set.metrics.ece if test_set.metrics else None)
    if isinstance(ece, (int, float)):
        st.markdown(f"**Calibration on these films:** a stated probability was off by {pct(ece)} on average "
                    "(expected calibration error).")
    if test_set.by_source:
        st.markdown("**By source within this external set**")
        _table(subgroup_table(test_set.by_source, source_name), "Each source of these films on its own; a "
               "source with films of one class has no balanced accuracy worth reading.")


def crossval_sentence(rows: list[Mapping[str, Any]]) -> str:
    """Each left-out source's balanced accuracy in words against its chance level."""
    parts = []
    for row in map(held_out_row, rows):
        ci = row.get("balanced_accuracy") or {}
        recall = row.get("recall") or {}
        chance = row.get("chance") or (1 / len(recall) if recall else 0.5)
        parts.append(f"{source_name(row.get('held_out'))} {pct(ci.get('estimate'))} (chance {pct(chance)}): "
                     f"**{judge(ci.get('estimate'), chance, ci.get('lo'), ci.get('hi'), good=0.8)}**")
    return "Balanced accuracy on each left-out source: " + "; ".join(parts) + "."


def _render_crossval(evaluation: Evaluation) -> None:
    """Held-out-source cross-validation: each source left out of training in turn."""
    rows = evaluation.crossval_rows
    if not rows:
        return
    crossval = evaluation.record.crossval or {}
    how = crossval_how(crossval)
    st.markdown("#### Each source left out of training in turn")
    st.markdown("The training recipe was run again once per source, each time **without** that source's films, and "
                "tested on the films it left out" + (f" ({how})" if how else "") + ". The model could not have "
                "learned anything about that hospital or collection, so this shows how the recipe does on a new one.")
    _table(crossval_table(rows), crossval_sentence(rows) + " The last column says how well the source alone told the "
           "classes apart among the sources the model did learn from ('–' where it was not measured).")
    skipped = crossval.get("skipped_sources") or {}
    if isinstance(skipped, Mapping) and skipped:
        st.caption("Too small to hold out: " + ", ".join(f"{source_name(s)} ({n} images)" for s, n in skipped.items()))


def render_gate(evaluation: Evaluation) -> None:
    """How often the input gate answers, marks or refuses, per kind of image (the evaluations' gate reports)."""
    reports = [("Test films (same sources as training)", evaluation.record.gate)]
    reports += [(f"Films from {dataset_name(s)}", s.gate) for s in evaluation.external]
    reports = [(label, r) for label, r in reports if isinstance(r, Mapping) and r.get("evaluated")]
    if not reports:
        return
    with st.expander("When the page does not answer: the input gate"):
        st.markdown("Before the model's output is shown, an input gate checks that the image is a frontal chest X-ray "
                    "like those the model learned from. *Unusual* films are shown and marked \"read with care\"; "
                    "refused images show the most likely reason instead of an output.")
        for label, report in reports:
            _table(gate_table(report, label), f"{label}: the share of images passed, marked unusual and refused. "
                   "Good is near 100% passed for chest films and near 100% refused for everything else.")


def render_trust(evaluation: Evaluation, point: OperatingPoint) -> None:
    """Films from sources the model never saw: the COVID answer on each set, external validation, cross-validation;
    or a clear note that there are none. No internal figure appears here."""
    if not evaluation.external and not evaluation.crossval_rows:
        st.warning(NO_EXTERNAL, icon=":material/warning:")
        return
    if not evaluation.external:
        st.warning("No external test set has been evaluated; the held-out-source results below are the closest "
                   "measure of how the model does elsewhere.", icon=":material/warning:")
    _render_covid(evaluation, point, internal=False)
    for test_set in evaluation.external:
        _render_external(test_set)
    _render_crossval(evaluation)


def _covid_sentence(sets: list[CovidSet], names: Mapping[str, str]) -> str:
    """Each set's COVID-or-not AUC in words against chance (0.50)."""
    parts = []
    for covid_set in sets:
        auc = covid_set.auc or Interval()
        name = covid_table([covid_set], names)["Films"].iloc[0]
        parts.append(f"{name} {num(auc.estimate)}: "
                     f"**{judge(auc.estimate, 0.5, auc.lo, auc.hi, good=0.85)}**")
    return "AUC: " + "; ".join(parts) + "." if parts else ""


def _render_covid(evaluation: Evaluation, point: OperatingPoint, internal: bool) -> None:
    """COVID or not, the question a clinician brings, on the sets of one kind: the internal test and its sources
    (``internal``), or the external sets and the left-out sources."""
    block = evaluation.record.covid_vs_rest
    sets = [s for s in (block.sets if block else []) if str(s.name or "").startswith("internal ") == internal]
    sets += [] if internal else [s for run in evaluation.external_runs
                                 for s in (run.covid_vs_rest.sets if run.covid_vs_rest else [])]
    if not sets:
        return
    names = {str(s.name): dataset_name(s) for s in evaluation.external}
    st.markdown("#### COVID or not" + ("" if internal else ", on films from sources it never saw"))
    st.markdown(f"{point.rule()} AUC: how well the COVID probability ranks COVID films above the others (0.50 is "
                "chance, 1.00 perfect); sensitivity: the share of COVID films it said yes to; specificity: the share "
                "of other films it said no to." + ("" if internal else " The left-out sources were scored by models "
                                                   "trained without them, with no threshold fixed, so they have an AUC "
                                                   "only ('–')."))
    _table(covid_table(sets, names), _covid_sentence(sets, names))


def _render_plots(data: EvaluationRecord, folder: Path | None) -> None:
    """The saved plot images that have an explanation (:data:`PLOT_CAPTIONS`), two per row."""
    if folder is None:
        return
    plots = [(name, folder / str(file)) for name, file in (data.plots or {}).items()
             if name in PLOT_CAPTIONS and (folder / str(file)).is_file()]
    cols = st.columns(2) if plots else []
    for index, (name, path) in enumerate(plots):
        cols[index % 2].image(str(path), caption=PLOT_CAPTIONS[name], width="stretch", alt=PLOT_CAPTIONS[name])


def render_internal(evaluation: Evaluation, point: OperatingPoint) -> None:
    """The internal test: held-out patients of the same sources as training, labelled as such."""
    data = evaluation.record
    parts = [f"**{'?' if data.n_images is None else data.n_images}** images"]
    if data.n_patients:
        parts.append(f"**{data.n_patients}** patients")
    st.markdown(f"Held-out {' and '.join(parts)} of the {data.split or 'test'} split: not used for training, "
                "but from the same hospitals and collections. These numbers are an upper bound for other places.")
    _warning_list("Caution about these numbers", list(data.warnings), _sources(data))
    _render_covid(evaluation, point, internal=True)
    _headline_metrics(data)
    if has_baselines(data):
        _table(comparison_table(data), comparison_sentence(data, "on the internal test"))
    else:
        estimate, lo, hi = _ci(data, "balanced_accuracy")
        chance = chance_level(data) or 0.5
        st.caption(f"Balanced accuracy {pct(estimate)} against a chance level of {pct(chance)}: "
                   f"{judge(estimate, chance, lo, hi, good=0.8)}. No source-only or metadata-only baseline was saved.")
    _table(per_class_table(data), "Per class when the model names its most likely class (95% intervals in "
           "brackets; – : not defined here, e.g. the PPV of a class the model never named). The page's COVID answer "
           "uses the threshold: its figures are in the COVID-or-not table above.")
    confusion = confusion_table(data)
    if confusion is not None:
        st.markdown("**Confusion matrix** (rows: the true class; columns: the most likely class; counts of images)")
        st.table(confusion, alt="Confusion matrix of the internal test")
    _render_plots(data, evaluation.folder)
    table = data.operating_points
    if table is not None and table.points:
        positive = table.positive or "the positive class"
        _table(operating_points_table(table.points), f"Other thresholds for '{positive}', chosen on the validation "
               "images for a target share of cases found; the last columns show what they gave on the test images. "
               "The page uses the threshold above, not these.")
    for key, title, name_of in (("by_source", "By image source", source_name), ("by_view", "By view", str)):
        groups = getattr(data, key)
        if groups:
            _table(subgroup_table(groups, name_of), f"{title}: does the model work equally well everywhere? A group "
                   "marked too small cannot tell.")


def render_training(predictor: Any, evaluation: Evaluation | None) -> None:
    """Training: validation AUC, calibration temperature and what it was fitted on, data, limitations, settings."""
    info = dict(getattr(predictor, "info", {}) or {})
    data = evaluation.record if evaluation else EvaluationRecord()
    card = data.model_card or {}
    cols = st.columns(3)
    cols[0].metric("Validation macro ROC-AUC", num(info.get("best_auc")),
                   help="on the validation split used to pick the epoch: optimistic by construction")
    planned = (info.get("config") or {}).get("epochs")
    cols[1].metric("Epoch kept", f"{info.get('best_epoch') or info.get('epoch') or '–'}"
                   + (f" of {planned}" if planned else ""), help="the epoch with the best validation macro ROC-AUC")
    cols[2].metric("Temperature", num(predictor.temperature), help="probability calibration; 1.00 = none")
    st.markdown(temperature_text(predictor.temperature, data, evaluation.external if evaluation else []))
    facts = _training_facts(predictor, evaluation)
    if isinstance(facts.get("split_counts"), Mapping):
        _table(counts_table(facts["split_counts"]).reset_index(names="Class"), "Images per class and split.")
    if isinstance(facts.get("class_by_source"), Mapping):
        _table(counts_table(facts["class_by_source"], rename_rows=True).reset_index(names="Source"),
               "Images per source and class: a source that gives one class only lets the model learn the source.")
    _warning_list("Caution: the training data are confounded", list(facts.get("confounding") or []), _sources(data))
    if card.get("limitations"):
        st.markdown("**Known limitations**\n\n" + "\n".join(f"- {item}" for item in card["limitations"]))
    if info.get("config"):
        st.markdown("**Training settings**")
        _table(key_value_table(setting_rows(info["config"])), "The settings of the training run, for researchers; "
               "files are named, not located (the full paths are in the run folder's records).")


def render_model_identity(predictor: Any) -> None:
    """Architecture, classes, input size and the checkpoint's digest (no server paths)."""
    st.markdown(f"**Architecture:** {predictor.arch}  \n**Classes:** {', '.join(predictor.classes)}  \n"
                f"**Input size:** {predictor.preprocess.img_size} px  \n"
                f"**Checkpoint SHA-256:** `{predictor.checkpoint_sha256}`")


def _training_facts(predictor: Any, evaluation: Evaluation | None) -> Mapping[str, Any]:
    """What the model was trained on: the model card's data facts, else the checkpoint's."""
    card = (evaluation.record.model_card or {}) if evaluation else {}
    info = dict(getattr(predictor, "info", {}) or {})
    facts = card.get("data") or info.get("data") or {}
    return facts if isinstance(facts, Mapping) else {}


def trained_on(predictor: Any, evaluation: Evaluation | None) -> str:
    """One sentence: how many films of which classes from which collections the model learned from."""
    facts = _training_facts(predictor, evaluation)
    images = facts.get("images") or facts.get("n_images")
    table = facts.get("class_by_source") if isinstance(facts.get("class_by_source"), Mapping) else {}
    sources = list(dict.fromkeys(source_name(s) for counts in table.values() if isinstance(counts, Mapping)
                                 for s in counts))
    what = f"{images} chest X-rays" if images else "chest X-rays (the number was not recorded)"
    patients = f" of {facts['patients']} patients" if facts.get("patients") else ""
    origin = f" from {', '.join(sources)}" if sources else ""
    return f"{what}{patients} labelled {', '.join(predictor.classes)}{origin}."


def render_summary(predictor: Any, evaluation: Evaluation | None, point: OperatingPoint) -> None:
    """The plain summary that fits one screen: trained on what, how it did on hospitals it never saw, how it
    answers, what it cannot do."""
    with st.container(key="model-summary"):
        st.subheader("This model in short", anchor=False)
        st.markdown(f"- **Trained on:** {trained_on(predictor, evaluation)}\n"
                    f"- **On hospitals it never saw:** {reliability_line(evaluation, point)}\n"
                    f"- **How it answers:** {point.rule()}\n"
                    f"- **What it cannot do:** {CANNOT}")
        if evaluation is None:
            st.info(not_evaluated(predictor))


def render_model_view(predictor: Any, evaluation: Evaluation | None) -> None:
    """The whole "Model and evaluation" tab: the summary, then the details folded."""
    point = predictor.operating_point
    for note in evaluation.notes if evaluation else []:
        st.warning(note)
    render_summary(predictor, evaluation, point)
    if evaluation is not None:
        if evaluation.report is not None:
            st.download_button("Download the full evaluation report (HTML)",
                               public_report(evaluation.report.read_bytes()),
                               file_name="covidxr_evaluation_report.html", mime="text/html", on_click="ignore",
                               icon=":material/download:")
        st.markdown("**Details**")
        with st.expander("How to read these numbers"):
            st.markdown(EXPLANATIONS)
        with st.expander("On films from sources it never saw"):
            render_trust(evaluation, point)
        with st.expander("Internal test (same sources as training)"):
            render_internal(evaluation, point)
        render_gate(evaluation)
    with st.expander("Training"):
        render_training(predictor, evaluation)
    with st.expander("The model"):
        render_model_identity(predictor)
