"""The "Model and evaluation" tab: how far the loaded model can be trusted, most honest numbers first.

Order: results on films from sources the model never saw (external validation, then held-out-source
cross-validation) beside what a classifier that sees only the source or other metadata achieves; then the internal
test (held-out patients of the same sources, clearly labelled internal); then training (validation AUC,
calibration temperature and what it was fitted on, data) and the model's identity. Without an external result the
tab says so first. Numbers come from the saved evaluation only (:mod:`app.evaluation`); nothing is recomputed.
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
    key_value_table,
    operating_points_table,
    per_class_table,
    subgroup_table,
)
from app.evaluation import Evaluation, dataset_name
from app.format import num, pct
from app.model_texts import (
    EXPLANATIONS,
    NO_EXTERNAL,
    PLOT_CAPTIONS,
    crossval_how,
    not_evaluated,
    single_class_sources,
    temperature_text,
)
from app.redact import public_report, setting_rows
from covidxr.sources_display import readable, source_name


def _warning_list(title: str, items: list[Any], sources: Any = ()) -> None:
    """Several cautions in one warning box, recorded source names replaced by dataset names."""
    if items:
        text = "\n".join(f"- {readable(str(item), sources)}" for item in items)
        st.warning(f"**{title}**\n\n{text}", icon=":material/warning:")


def _sources(data: Mapping[str, Any]) -> set[str]:
    """Every recorded source name an evaluation mentions (its breakdown and its training data table)."""
    facts = (data.get("model_card") or {}).get("data") or {}
    names = set(data.get("by_source") or {})
    for table in (facts.get("class_by_source"), (facts.get("evaluated") or {}).get("class_by_source")):
        if isinstance(table, Mapping):
            names |= {s for counts in table.values() if isinstance(counts, Mapping) for s in counts}
    return names


def _headline_metrics(data: Mapping[str, Any]) -> None:
    """Balanced accuracy and macro ROC-AUC, accuracy and macro F1 as metric tiles, each interval below its tile."""
    shown = (("balanced_accuracy", "Balanced accuracy", pct, "average sensitivity over the classes"),
             ("roc_auc_macro", "Macro ROC-AUC", num, "ROC-AUC averaged over classes (0.5 chance, 1 perfect)"),
             ("accuracy", "Accuracy", pct, "share of all test images classified correctly"),
             ("f1_macro", "Macro F1", num, "balance of PPV and sensitivity, averaged over classes (0 to 1)"))
    cols = st.columns(len(shown))
    for col, (key, label, fmt, meaning) in zip(cols, shown, strict=True):
        ci = ((data.get("ci") or {}).get("metrics") or {}).get(key) or {}
        col.metric(label, fmt(ci.get("estimate", (data.get("metrics") or {}).get(key))), help=meaning)
        if ci.get("lo") is not None and ci.get("hi") is not None:
            col.caption(f"95% interval {fmt(ci['lo'])}–{fmt(ci['hi'])}")


def _table(frame: Any, caption: str | None = None) -> None:
    """A static table (wraps at narrow widths) without its index, with a caption."""
    if frame is not None and len(frame):
        st.table(frame, hide_index=True, alt=caption)
        if caption:
            st.caption(caption)


def _render_external(test_set: Mapping[str, Any]) -> None:
    """One external test set: size, headline with intervals, per-class recall and AUC, baselines, calibration."""
    name = dataset_name(test_set)
    patients = f", {test_set['n_patients']} patients" if test_set.get("n_patients") else ""
    st.markdown(f"#### External validation: {name}")
    st.markdown(f"**{test_set.get('n_images', '?')} images{patients}** from sources the model never saw in "
                "training, validation or model selection.")
    _warning_list("Caution about these numbers", list(test_set.get("warnings") or []),
                  set(test_set.get("by_source") or {}))
    single = single_class_sources(test_set)
    if single:
        st.warning(f"**Caution:** {', '.join(source_name(s) for s in single)} "
                   f"{'gives' if len(single) == 1 else 'each give'} films of a single class here, so on "
                   f"{'it' if len(single) == 1 else 'them'} these numbers cannot tell recognising the disease from "
                   "recognising the source.", icon=":material/warning:")
    _table(comparison_table(test_set), "This model beside a guess (the chance level of balanced accuracy is one "
           "over the number of classes present) and classifiers that see only metadata, learned on the "
           "training split and tested on these films. They have never seen these sources, so they can only guess the "
           "commonest training class of a similar film: a model far above them is not just reading the source.")
    table = per_class_table(test_set, "Images")
    absent = [str(c) for c, n in zip(table.get("Class", []), table.get("Images", []), strict=True) if not n]
    _table(table[[bool(n) for n in table["Images"]]] if absent else table,
           "Per class on the external films, 95% intervals in brackets."
           + (f" No {', '.join(absent)} films in this set, so nothing is measured for that class." if absent else ""))
    took = {c: n for c, n in (test_set.get("absent_class_calls") or {}).items() if n}
    if took:
        st.markdown("**Answers of a class this set does not have:** " + "; ".join(
            f"{n} of {test_set.get('n_images', '?')} films were called {c}" for c, n in took.items())
            + ". The COVID-or-not table above does not depend on them.")
    calibration = test_set.get("calibration") or {}
    ece = calibration.get("ece_after", calibration.get("ece", (test_set.get("metrics") or {}).get("ece")))
    if isinstance(ece, (int, float)):
        st.markdown(f"**Calibration on these films:** a stated probability was off by {pct(ece)} on average "
                    "(expected calibration error).")
    if isinstance(test_set.get("by_source"), Mapping) and test_set["by_source"]:
        with st.expander("By source within this external set"):
            _table(subgroup_table(test_set["by_source"], source_name))


def _render_crossval(evaluation: Evaluation) -> None:
    """Held-out-source cross-validation: each source left out of training in turn."""
    rows = evaluation.crossval_rows
    if not rows:
        return
    crossval = evaluation.data.get("crossval") or {}
    how = crossval_how(crossval)
    st.markdown("#### Each source left out of training in turn")
    st.markdown("The training recipe was run again once per source, each time **without** that source's films, and "
                "tested on the films it left out" + (f" ({how})" if how else "") + ". The model could not have "
                "learned anything about that hospital or collection, so this shows how the recipe does on a new one.")
    _table(crossval_table(rows), "One row per source left out, 95% intervals in brackets. Chance level: the balanced "
           "accuracy of a guess (one over the classes present). The last column says how well the source alone told "
           "the classes apart among the sources the model did learn from (the shortcut it could take there; "
           "'–' where it was not measured). A source alone says nothing about the left-out source: it was never "
           "seen.")
    skipped = crossval.get("skipped_sources") or {}
    if isinstance(skipped, Mapping) and skipped:
        st.caption("Too small to hold out: " + ", ".join(f"{source_name(s)} ({n} images)" for s, n in skipped.items()))


def render_gate(evaluation: Evaluation) -> None:
    """How often the input gate answers, marks or refuses, per kind of image (the evaluations' gate reports)."""
    reports = [("Test films (same sources as training)", evaluation.data.get("gate"))]
    reports += [(f"Films from {dataset_name(s)}", s.get("gate")) for s in evaluation.external]
    reports = [(label, r) for label, r in reports if isinstance(r, Mapping) and r.get("evaluated")]
    if not reports:
        return
    st.subheader("When the page does not answer", anchor=False)
    st.markdown("Before the model's output is shown, an input gate checks that the image is a frontal chest X-ray "
                "like those the model learned from. *Unusual* films are shown and marked \"read with care\"; "
                "refused images show the most likely reason instead of an output.")
    for label, report in reports:
        _table(gate_table(report, label), f"{label}: share of images passed, marked unusual and refused.")


def render_trust(evaluation: Evaluation) -> None:
    """The honest numbers: external validation and cross-validation first, or a clear note that there are none."""
    st.subheader("On films from sources it never saw", anchor=False)
    if not evaluation.external and not evaluation.crossval_rows:
        st.warning(NO_EXTERNAL, icon=":material/warning:")
    elif not evaluation.external:
        st.warning("No external test set has been evaluated; the held-out-source results below are the closest "
                   "measure of how the model does elsewhere.", icon=":material/warning:")
    _render_covid(evaluation.data.get("covid_vs_rest"))
    for test_set in evaluation.external:
        _render_external(test_set)
    _render_crossval(evaluation)


def _render_covid(block: Mapping[str, Any] | None) -> None:
    """COVID or not, first: the question a clinician brings, on every set of films the evaluation has."""
    if not block or not block.get("sets"):
        return
    st.markdown("#### COVID or not")
    threshold = block.get("threshold")
    rule = (f"The page calls a film COVID when its COVID probability is at least {pct(threshold)}, a threshold "
            f"fixed before these films were scored ({block.get('chosen_on')})." if threshold is not None
            else "No threshold was fixed for this model.")
    st.markdown(f"{rule} AUC: how well the COVID probability ranks COVID films above the others (0.50 is chance, "
                "1.00 perfect). The rows 'Internal test, SIIM ... only' come from one collection where COVID and "
                "normal films share hospitals: the cleanest measure of the disease signal. Films from sources "
                "left out of training were scored by a model trained without them (AUC only).")
    _table(covid_table(block), "COVID against every other class, with 95% intervals.")


def _render_plots(data: Mapping[str, Any], folder: Path | None) -> None:
    """The saved plot images: confusion matrix and ROC first, the others in an expander."""
    if folder is None:
        return
    plots = {name: folder / str(file) for name, file in (data.get("plots") or {}).items()
             if (folder / str(file)).is_file()}
    main = [name for name in ("confusion_counts", "roc") if name in plots]
    if main:
        cols = st.columns(len(main))
        for col, name in zip(cols, main, strict=True):
            col.image(str(plots[name]), caption=PLOT_CAPTIONS[name], width="stretch", alt=PLOT_CAPTIONS[name])
    others = [name for name in plots if name not in main]
    if others:
        with st.expander("More plots"):
            cols = st.columns(2)
            for index, name in enumerate(others):
                label = PLOT_CAPTIONS.get(name, name)
                cols[index % 2].image(str(plots[name]), caption=label, width="stretch", alt=label)


def render_internal(evaluation: Evaluation) -> None:
    """The internal test: held-out patients of the same sources as training, labelled as such."""
    data = evaluation.data
    st.subheader("Internal test (same sources as training)", anchor=False)
    parts = [f"**{data.get('n_images', '?')}** images"]
    if data.get("n_patients"):
        parts.append(f"**{data['n_patients']}** patients")
    st.markdown(f"Held-out {' and '.join(parts)} of the {data.get('split', 'test')} split: not used for training, "
                "but from the same hospitals and collections. These numbers are an upper bound for other places.")
    _warning_list("Caution about these numbers", list(data.get("warnings") or []), _sources(data))
    _headline_metrics(data)
    chance = chance_level(data)
    if chance is not None:
        st.caption(f"Chance level of balanced accuracy here: {pct(chance)} (a guess among the classes present).")
    if has_baselines(data):
        _table(comparison_table(data), "The model beside classifiers that see only metadata (learned on the "
               "training split, tested on the same images).")
    else:
        st.caption("No source-only or metadata-only baseline was saved with this evaluation.")
    st.markdown(EXPLANATIONS)
    _table(per_class_table(data), "– : not defined on this test set (e.g. PPV of a class the model never predicted).")
    confusion = confusion_table(data)
    if confusion is not None:
        st.markdown("**Confusion matrix** (rows: the true class; columns: what the model said; counts of images)")
        st.table(confusion, alt="Confusion matrix of the internal test")
    _render_plots(data, evaluation.folder)
    table = data.get("operating_points") or {}
    if isinstance(table, Mapping) and table.get("points"):
        positive = table.get("positive", "the positive class")
        st.markdown(f"**Operating points for '{positive}'**: thresholds chosen on the validation images for a target "
                    "share of cases found; the last columns show what they gave on the test images.")
        _table(operating_points_table(table["points"]))
    for key, title, name_of in (("by_source", "By image source", source_name), ("by_view", "By view", str)):
        groups = data.get(key)
        if isinstance(groups, Mapping) and groups:
            with st.expander(f"{title}: does the model work equally well everywhere?"):
                _table(subgroup_table(groups, name_of))


def render_training(predictor: Any, evaluation: Evaluation | None) -> None:
    """Training: validation AUC, calibration temperature and what it was fitted on, data, limitations, settings."""
    info = dict(getattr(predictor, "info", {}) or {})
    data = evaluation.data if evaluation else {}
    card = data.get("model_card") or {}
    st.subheader("Training", anchor=False)
    cols = st.columns(3)
    cols[0].metric("Validation macro ROC-AUC", num(info.get("best_auc")),
                   help="on the validation split used to pick the epoch: optimistic by construction")
    planned = (info.get("config") or {}).get("epochs")
    cols[1].metric("Epoch kept", f"{info.get('best_epoch') or info.get('epoch') or '–'}"
                   + (f" of {planned}" if planned else ""), help="the epoch with the best validation macro ROC-AUC")
    cols[2].metric("Temperature", num(predictor.temperature), help="probability calibration; 1.00 = none")
    st.markdown(temperature_text(predictor.temperature, data, evaluation.external if evaluation else []))
    facts = card.get("data") or info.get("data") or {}
    if facts.get("images") or facts.get("n_images"):
        st.markdown(f"**Training data:** {facts.get('images') or facts.get('n_images')} images"
                    + (f", {facts['patients']} patients" if facts.get("patients") else ""))
    if isinstance(facts.get("split_counts"), Mapping):
        _table(counts_table(facts["split_counts"]).reset_index(names="Class"), "Images per class and split")
    if isinstance(facts.get("class_by_source"), Mapping):
        _table(counts_table(facts["class_by_source"], rename_rows=True).reset_index(names="Source"),
               "Images per source and class")
    _warning_list("Caution: the training data are confounded", list(facts.get("confounding") or []), _sources(data))
    if card.get("limitations"):
        st.markdown("**Known limitations**\n\n" + "\n".join(f"- {item}" for item in card["limitations"]))
    if info.get("config"):
        with st.expander("Training settings"):
            _table(key_value_table(setting_rows(info["config"])), "Files are named, not located: the full paths are in "
                   "the run folder's records.")


def render_model_identity(predictor: Any) -> None:
    """Architecture, classes, input size and the checkpoint's digest (no server paths)."""
    st.subheader("The model", anchor=False)
    st.markdown(f"**Architecture:** {predictor.arch}  \n**Classes:** {', '.join(predictor.classes)}  \n"
                f"**Input size:** {predictor.preprocess.img_size} px  \n"
                f"**Checkpoint SHA-256:** `{predictor.checkpoint_sha256}`")


def render_model_view(predictor: Any, evaluation: Evaluation | None) -> None:
    """The whole "Model and evaluation" tab."""
    if evaluation is None:
        st.info(not_evaluated(predictor))
    else:
        for note in evaluation.notes:
            st.warning(note)
        if evaluation.report is not None:
            st.download_button("Download the full evaluation report (HTML)",
                               public_report(evaluation.report.read_bytes()),
                               file_name="covidxr_evaluation_report.html", mime="text/html", on_click="ignore",
                               icon=":material/download:")
        render_trust(evaluation)
        st.divider()
        render_internal(evaluation)
        render_gate(evaluation)
    st.divider()
    render_training(predictor, evaluation)
    st.divider()
    render_model_identity(predictor)
