"""The "Model and evaluation" view: what the loaded model is and how it did on held-out data, in plain words.

Numbers come from the saved evaluation only (the checkpoint's ``evaluation`` entry and ``eval/metrics.json`` beside
the checkpoint, written by ``python -m covidxr.evaluate``); nothing is recomputed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

EXPLANATIONS = """\
**How to read these numbers** (each is measured per class, "this class" against all others):

- **Sensitivity**: of the test images that truly show this class, the share the model found.
- **Specificity**: of the test images that do not show this class, the share the model correctly did not call it.
- **PPV** (positive predictive value): when the model says this class, how often it is right.
  PPV and NPV depend on how common each class is in the test set, which is usually not the same as in your clinic.
- **NPV** (negative predictive value): when the model says *not* this class, how often that is right.
- **ROC-AUC**: the chance that an image with this class gets a higher score than one without it
  (0.5 = coin toss, 1.0 = perfect separation).
- **95% interval** (in brackets): the range the value plausibly lies in, given how few test patients there were
  (bootstrap over patients). Wide intervals mean the estimate is uncertain.
"""

NOT_EVALUATED = (
    "This model has not been evaluated yet, so there are no test-set numbers to show. Run:\n\n"
    "```bash\npython -m covidxr.evaluate --checkpoint {path}\n```\n\nthen reload this page."
)


@st.cache_data(max_entries=16, show_spinner=False)
def _read_json(path: str, mtime_ns: int) -> dict[str, Any] | None:
    """Read a JSON file (cached per path and modification time).

    Args:
        path: the file.
        mtime_ns: its modification time, part of the cache key only.

    Returns:
        The parsed object, or None when it is unreadable or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics_json_path(predictor: Any) -> Path:
    """Where the evaluation CLI wrote metrics.json for this checkpoint (the summary names it relative to the run)."""
    run_dir = Path(predictor.checkpoint_path).parent
    saved = (getattr(predictor, "metrics", None) or {}).get("metrics_json")
    if saved and (run_dir / str(saved)).is_file():
        return run_dir / str(saved)
    return run_dir / "eval" / "metrics.json"


def load_evaluation(predictor: Any) -> tuple[dict[str, Any] | None, Path, list[str]]:
    """The saved evaluation of the loaded model.

    ``python -m covidxr.evaluate`` writes the full ``eval/metrics.json`` and stores a summary (same numbers, no
    confusion matrix, plots or subgroups) in the checkpoint; both record the SHA-256 of the checkpoint *as
    evaluated*. The full file is used when it belongs to the checkpoint's own evaluation (or, without a summary,
    to this very file); otherwise the summary is shown, and a note says why.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.

    Returns:
        ``(evaluation or None, folder holding the plot images, notes to show)``.
    """
    path = _metrics_json_path(predictor)
    full = _read_json(str(path), path.stat().st_mtime_ns) if path.is_file() else None
    summary = getattr(predictor, "metrics", None) or None
    if full is None:
        return summary, path.parent, []
    if summary is not None:
        if full.get("checkpoint_sha256") == summary.get("checkpoint_sha256"):
            return full, path.parent, []
        return summary, path.parent, [f"{path} comes from another evaluation than the one stored in the "
                                      "checkpoint; showing the checkpoint's own summary (no plots)."]
    if full.get("checkpoint_sha256") not in (None, predictor.checkpoint_sha256):
        return full, path.parent, [f"{path} was computed for another checkpoint file; its numbers may not "
                                   "describe the loaded model. Evaluate again."]
    return full, path.parent, []


def _pct(value: Any) -> str:
    """A share as a percentage, or a dash when undefined."""
    return "–" if not isinstance(value, (int, float)) or value != value else f"{100 * value:.0f}%"


def _num(value: Any) -> str:
    """A number with two decimals, or a dash when undefined."""
    return "–" if not isinstance(value, (int, float)) or value != value else f"{value:.2f}"


def _with_ci(value: Any, ci: Mapping[str, Any] | None, fmt: Any = _pct) -> str:
    """``value (lo–hi)`` when an interval is known, else just the value."""
    if not ci:
        return fmt(value)
    estimate = ci.get("estimate", value)
    lo, hi = ci.get("lo"), ci.get("hi")
    if lo is None or hi is None:
        return fmt(estimate)
    return f"{fmt(estimate)} ({fmt(lo)}–{fmt(hi)})"


def per_class_table(evaluation: Mapping[str, Any]) -> pd.DataFrame:
    """One row per class: test images, sensitivity, specificity, PPV, NPV (with intervals where saved), ROC-AUC.

    Args:
        evaluation: the saved evaluation (metrics.json layout).

    Returns:
        A table of display strings.
    """
    metrics = evaluation.get("metrics") or {}
    ci = (evaluation.get("ci") or {}).get("per_class") or {}
    rows = []
    for name, values in (metrics.get("per_class") or {}).items():
        intervals = ci.get(name) or {}
        rows.append({
            "Class": name,
            "Test images": values.get("support"),
            "Sensitivity (95% CI)": _with_ci(values.get("recall"), intervals.get("sensitivity")),
            "Specificity (95% CI)": _with_ci(values.get("specificity"), intervals.get("specificity")),
            "PPV": _pct(values.get("precision")),
            "NPV": _pct(values.get("npv")),
            "ROC-AUC": _num(values.get("roc_auc")),
        })
    return pd.DataFrame(rows)


def confusion_table(evaluation: Mapping[str, Any]) -> pd.DataFrame | None:
    """The confusion matrix with readable row and column names (rows: truth, columns: model output).

    Args:
        evaluation: the saved evaluation.

    Returns:
        The table, or None when it was not saved.
    """
    metrics = evaluation.get("metrics") or {}
    matrix = metrics.get("confusion_matrix")
    classes = evaluation.get("classes") or metrics.get("classes") or list((metrics.get("per_class") or {}).keys())
    if not matrix or len(matrix) != len(classes):
        return None
    return pd.DataFrame(matrix, index=[f"truly {c}" for c in classes], columns=[f"model: {c}" for c in classes])


def _warning_list(title: str, items: list[Any]) -> None:
    """Several cautions in one warning box."""
    if items:
        st.warning(f"**{title}**\n\n" + "\n".join(f"- {item}" for item in items), icon=":material/warning:")


def _render_training_data(info: Mapping[str, Any], card: Mapping[str, Any]) -> None:
    """Training data: size, split by class, sources per class and confounding warnings."""
    data = card.get("data") or info.get("data") or info.get("data_summary") or {}
    if not data:
        return
    st.markdown("**Training data**")
    labels = (("training_data", "Data"), ("root", "Data"), ("images", "Images"), ("n_images", "Images"),
              ("patients", "Patients"), ("n_unreadable", "Unreadable images skipped"))
    facts = dict.fromkeys(f"**{label}:** {data[key]}" for key, label in labels if data.get(key) is not None)
    if facts:
        st.markdown("  \n".join(facts))
    if isinstance(data.get("split_counts"), dict):
        counts = pd.DataFrame(data["split_counts"]).fillna(0).astype(int)
        st.caption("Images per class (rows) and split (columns)")
        st.dataframe(counts)
    if isinstance(data.get("class_by_source"), dict):
        st.caption("Images per class (columns) and source (rows)")
        st.dataframe(pd.DataFrame(data["class_by_source"]).fillna(0).astype(int))
    _warning_list("Caution: the training data are confounded", list(data.get("confounding") or []))
    rest = {k: v for k, v in data.items()
            if k not in {key for key, _ in labels} | {"split_counts", "class_by_source", "confounding"}}
    if rest:
        with st.expander("More about the data"):
            st.json(rest, expanded=1)


def render_model_info(predictor: Any) -> None:
    """Architecture, classes, input size and the checkpoint's identity.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
    """
    info = dict(getattr(predictor, "info", {}) or {})
    st.subheader("The model", anchor=False)
    cols = st.columns(4)
    cols[0].metric("Architecture", str(info.get("arch", predictor.arch)))
    cols[1].metric("Classes", len(predictor.classes), help=", ".join(predictor.classes))
    cols[2].metric("Input size", f"{predictor.preprocess.img_size} px")
    cols[3].metric("Validation ROC-AUC", _num(info.get("best_auc")),
                   help="macro ROC-AUC on the validation split used to pick the epoch; the test-set evaluation "
                        "below is the unbiased estimate")
    st.markdown(f"**Classes:** {', '.join(predictor.classes)}  \n"
                f"**Epochs trained:** {info.get('epoch', '–')}  \n"
                f"**Probability calibration:** temperature {predictor.temperature:.2f} (1.00 = none)  \n"
                f"**Checkpoint:** `{predictor.checkpoint_path}`  \n"
                f"**Checkpoint SHA-256:** `{predictor.checkpoint_sha256}`")


def render_data_and_limitations(predictor: Any, evaluation: Mapping[str, Any] | None) -> None:
    """Training data summary, known limitations and the training configuration.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
        evaluation: the saved evaluation (its model card adds data details and limitations), or None.
    """
    info = dict(getattr(predictor, "info", {}) or {})
    card = (evaluation or {}).get("model_card") or {}
    st.subheader("Training data and limitations", anchor=False)
    _render_training_data(info, card)
    if card.get("limitations"):
        st.markdown("**Known limitations**\n\n" + "\n".join(f"- {item}" for item in card["limitations"]))
    if info.get("config"):
        with st.expander("Training configuration"):
            st.json(info["config"], expanded=False)


def _render_headline(evaluation: Mapping[str, Any]) -> None:
    """Overall accuracy, balanced accuracy, macro F1 and macro ROC-AUC with their intervals."""
    metrics = evaluation.get("metrics") or {}
    ci = (evaluation.get("ci") or {}).get("metrics") or {}
    shown = (("accuracy", "Accuracy", _pct, "share of all test images classified correctly"),
             ("balanced_accuracy", "Balanced accuracy", _pct, "average sensitivity over the classes"),
             ("f1_macro", "Macro F1", _num, "balance of PPV and sensitivity, averaged over classes (0 to 1)"),
             ("roc_auc_macro", "Macro ROC-AUC", _num, "ROC-AUC averaged over classes (0.5 chance, 1 perfect)"))
    cols = st.columns(len(shown))
    for col, (key, label, fmt, meaning) in zip(cols, shown, strict=True):
        interval = ci.get(key) or {}
        value = interval.get("estimate", metrics.get(key))
        col.metric(label, fmt(value), help=meaning)
        if interval.get("lo") is not None and interval.get("hi") is not None:
            col.caption(f"95% CI {fmt(interval['lo'])}–{fmt(interval['hi'])}")


def _render_plots(evaluation: Mapping[str, Any], folder: Path) -> None:
    """The saved plot images: confusion matrix and ROC first, the others in an expander."""
    plots = {name: folder / str(file) for name, file in (evaluation.get("plots") or {}).items()
             if (folder / str(file)).is_file()}
    main = [name for name in ("confusion_counts", "roc") if name in plots]
    captions = {"confusion_counts": "Confusion matrix (counts)", "roc": "ROC curves, one class against the rest",
                "confusion_normalized": "Confusion matrix (share of each true class)",
                "pr": "Precision-recall curves", "reliability": "Calibration (reliability diagram)",
                "history": "Training curves"}
    if main:
        cols = st.columns(len(main))
        for col, name in zip(cols, main, strict=True):
            col.image(str(plots[name]), caption=captions[name], width="stretch")
    others = [name for name in plots if name not in main]
    if others:
        with st.expander("More plots"):
            cols = st.columns(2)
            for index, name in enumerate(others):
                cols[index % 2].image(str(plots[name]), caption=captions.get(name, name), width="stretch")


def _render_calibration(evaluation: Mapping[str, Any]) -> None:
    """Temperature scaling and expected calibration error, explained."""
    calibration = evaluation.get("calibration") or {}
    if not calibration:
        return
    st.markdown(
        f"**Calibration:** probabilities are rescaled with temperature {_num(calibration.get('temperature'))}. "
        f"The average gap between the stated probability and how often the model was actually right "
        f"(expected calibration error) went from {_pct(calibration.get('ece_before'))} "
        f"to {_pct(calibration.get('ece_after'))}.")


def _render_operating_points(evaluation: Mapping[str, Any]) -> None:
    """Thresholds chosen on validation for target sensitivities, and what they gave on test."""
    table = evaluation.get("operating_points") or {}
    points = table.get("points") if isinstance(table, dict) else None
    if not points:
        return
    positive = table.get("positive", "the positive class")
    st.markdown(f"**Operating points for '{positive}'**: if you need to find a given share of '{positive}' "
                "cases, the threshold below was chosen on the validation images; the last two columns show what "
                "it gave on the test images.")
    rows = [{"Target sensitivity": _pct(p.get("target_sensitivity")), "Threshold": _num(p.get("threshold")),
             "Test sensitivity": _pct(p.get("test_sensitivity")), "Test specificity": _pct(p.get("test_specificity")),
             "Note": p.get("reason") or ""} for p in points]
    st.dataframe(pd.DataFrame(rows), hide_index=True)


def _subgroup_table(groups: Mapping[str, Any]) -> pd.DataFrame:
    """One row per subgroup (source or view): images, accuracy, balanced accuracy, ROC-AUC."""
    rows = [{"Group": name, "Images": g.get("n"), "Accuracy": _pct(g.get("accuracy")),
             "Balanced accuracy": _pct(g.get("balanced_accuracy")), "Macro ROC-AUC": _num(g.get("roc_auc_macro")),
             "Too small to judge": "yes" if g.get("small") else ""}
            for name, g in groups.items() if isinstance(g, dict)]
    return pd.DataFrame(rows)


def _render_subgroups(evaluation: Mapping[str, Any]) -> None:
    """Results by image source and by view, where the evaluation saved them."""
    for key, title in (("by_source", "By image source"), ("by_view", "By view")):
        groups = evaluation.get(key)
        if isinstance(groups, dict) and groups:
            with st.expander(f"{title}: does the model work equally well everywhere?"):
                st.dataframe(_subgroup_table(groups), hide_index=True)


def render_evaluation(predictor: Any, evaluation: Mapping[str, Any] | None, folder: Path, notes: list[str]) -> None:
    """The test-set evaluation of the loaded model, or how to produce it.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
        evaluation: from :func:`load_evaluation`.
        folder: the folder holding the plots.
        notes: remarks from :func:`load_evaluation`.
    """
    st.subheader("How well it did on held-out test images", anchor=False)
    if evaluation is None:
        st.info(NOT_EVALUATED.format(path=predictor.checkpoint_path))
        return
    for note in notes:
        st.warning(note)
    parts = [f"split **{evaluation.get('split', 'test')}**", f"**{evaluation.get('n_images', '?')}** images"]
    if evaluation.get("n_patients"):
        parts.append(f"**{evaluation['n_patients']}** patients")
    st.markdown("Evaluated on " + ", ".join(parts) + " that were not used for training.")
    _warning_list("Caution about these numbers", list(evaluation.get("warnings") or []))
    _render_headline(evaluation)
    st.markdown(EXPLANATIONS)
    table = per_class_table(evaluation)
    if not table.empty:
        st.dataframe(table, hide_index=True)
        st.caption("– : not defined on this test set (e.g. PPV of a class the model never predicted).")
    confusion = confusion_table(evaluation)
    if confusion is not None:
        st.markdown("**Confusion matrix** (rows: the true class; columns: what the model said; counts of images)")
        st.dataframe(confusion)
    _render_plots(evaluation, folder)
    _render_calibration(evaluation)
    _render_operating_points(evaluation)
    _render_subgroups(evaluation)
    if (folder / "report.html").is_file():
        st.caption(f"Full report (open in a browser): `{folder / 'report.html'}`")


def render_model_view(predictor: Any) -> None:
    """The whole "Model and evaluation" tab.

    Args:
        predictor: the loaded ``covidxr.inference.predictor.Predictor``.
    """
    evaluation, folder, notes = load_evaluation(predictor)
    render_model_info(predictor)
    st.divider()
    render_evaluation(predictor, evaluation, folder, notes)
    st.divider()
    render_data_and_limitations(predictor, evaluation)
