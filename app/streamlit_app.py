"""covidxr clinician page: upload chest X-rays, see the model's output, its Grad-CAM explanation and its evaluation.

Launch (from the repository root)::

    streamlit run app/streamlit_app.py -- --checkpoint runs/resnet50/best.pt [--runs runs] [--audit-log FILE]

or set ``COVIDXR_CHECKPOINT`` / ``COVIDXR_RUNS`` / ``COVIDXR_AUDIT_LOG``. Without a checkpoint the page lists the
``*/best.pt`` files under the runs folder, or explains how to train one. The model is loaded once per process
(``st.cache_resource``, keyed by checkpoint path and modification time) and shared by all browser sessions.
Uploads stay in memory; every prediction is recorded in the audit log (``covidxr.inference.prediction_log``; default
``audit.jsonl`` beside the checkpoint) without names, patient identifiers or the image itself.

The page is thin: reading is ``covidxr.io``, prediction and explanation are ``covidxr.inference.predictor`` and
``covidxr.explain``, the numbers of the model view come from the saved evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st
from app_model_view import render_model_view
from app_results import INTENDED_USE, Context, FileResult, Upload, render_upload, results_csv
from app_settings import TRAIN_COMMANDS, AppSettings, checkpoint_choices, load_settings

from covidxr.errors import CovidxrError
from covidxr.inference.prediction_log import PredictionLog, new_session_id
from covidxr.io import MAX_FILE_BYTES

if TYPE_CHECKING:  # torch loads with the first model, after the page's first lines are shown
    from covidxr.inference.predictor import Predictor

log = logging.getLogger("covidxr.app")

# A MIME type in the list makes Streamlit leave the check to the browser's file picker instead of failing the whole
# page on a bypassed filter; the content is checked by covidxr.io either way.
IMAGE_TYPES = ["image/*", ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".bmp", ".tif", ".tiff", ".webp", ".jp2"]
STORE_KEY = "covidxr_store"
SESSION_KEY = "covidxr_session_id"


@st.cache_resource(max_entries=4, show_spinner="Loading the model...")
def load_model(path: str, mtime_ns: int) -> Predictor:
    """Load a checkpoint once per process (the cache key includes its modification time, so a new file reloads).

    The predictor is shared by all sessions; it serialises its own model calls (explanations hook into the model).

    Args:
        path: the checkpoint file.
        mtime_ns: its modification time (cache key only).

    Returns:
        The predictor.

    Raises:
        CovidxrError: the checkpoint is missing, unsafe or invalid.
    """
    from covidxr.inference.predictor import Predictor

    return Predictor.from_checkpoint(path)


def _session() -> tuple[str, dict]:
    """This browser session's random id and in-memory cache."""
    if SESSION_KEY not in st.session_state:
        st.session_state[SESSION_KEY] = new_session_id()
    if STORE_KEY not in st.session_state:
        st.session_state[STORE_KEY] = {}
    return st.session_state[SESSION_KEY], st.session_state[STORE_KEY]


def _sidebar(settings: AppSettings) -> tuple[Path | None, bool]:
    """Model choice and upload options in the sidebar.

    Returns:
        ``(chosen checkpoint or None, whether files without an extension are accepted)``.
    """
    with st.sidebar:
        st.header("Model")
        choices = checkpoint_choices(settings)
        chosen = None
        if choices:
            chosen = st.selectbox("Checkpoint", choices, format_func=lambda p: f"{p.parent.name}/{p.name}",
                                  help=f"The configured checkpoint and the best.pt files under {settings.runs}/")
        else:
            st.caption(f"No checkpoint configured and none found under {settings.runs}/.")
        st.header("Upload options")
        any_name = st.checkbox("Accept files without an extension", value=False,
                               help="DICOM files exported from a PACS often have no .dcm extension. The content "
                                    "is checked either way. Changing this clears the uploaded files.")
        st.divider()
        st.caption(INTENDED_USE)
    return chosen, any_name


def _no_model(settings: AppSettings, problem: str | None) -> None:
    """Explain how to get a model when none can be loaded."""
    if problem:
        st.error(problem)
    st.subheader("No model loaded yet")
    st.markdown("This page needs a trained checkpoint. From the repository root, train and evaluate one, then "
                "start the page with it:")
    st.code(TRAIN_COMMANDS, language="bash")
    st.markdown(f"Or set `COVIDXR_CHECKPOINT=path/to/best.pt`, or put run folders under `{settings.runs}/` "
                "(each with a `best.pt`) and pick one in the sidebar.")


def _uploads(any_name: bool) -> list[Upload]:
    """The file uploader; returns the uploaded files (kept in memory)."""
    files = st.file_uploader(
        "Chest X-rays (PNG, JPEG, DICOM, ...): one or several frontal views",
        type=None if any_name else IMAGE_TYPES, accept_multiple_files=True,
        max_upload_size=MAX_FILE_BYTES // 2**20, key="uploads" + ("-any" if any_name else ""),
        help=f"Up to {MAX_FILE_BYTES // 2**20} MB per file. Files stay in memory and are not stored.")
    return [Upload(name=f.name, data=f.getvalue(), key=f.file_id) for f in files or []]


def _prune(store: dict, uploads: list[Upload], model_key: str) -> None:
    """Forget cached images and predictions of removed files, and predictions of another model."""
    live = {u.key for u in uploads}
    # keys are (kind, upload key, ...); prediction keys are ("prediction", upload key, model key, method, class)
    stale = [k for k in store if k[1] not in live or (k[0] == "prediction" and k[2] != model_key)]
    for key in stale:
        del store[key]


def _results_tab(predictor: Predictor, model_key: str, audit: PredictionLog | None, any_name: bool) -> None:
    """Upload, then one box per file and a CSV of all results."""
    session_id, store = _session()
    uploads = _uploads(any_name)
    _prune(store, uploads, model_key)
    if not uploads:
        st.info("Upload one or more chest X-rays to see the model's output and where it looked.")
        return
    summary = st.container()
    ctx = Context(predictor, model_key, audit, session_id, store)
    results: list[FileResult] = [r for r in (render_upload(u, ctx) for u in uploads) if r is not None]
    with summary:
        for error in dict.fromkeys(ctx.audit_errors):
            st.error(f"Audit log not written: {error}. The predictions below were not recorded.")
        if results:
            st.download_button(f"Download all results as CSV ({len(results)} files)",
                               results_csv(results, list(predictor.classes)), file_name="covidxr_results.csv",
                               mime="text/csv", on_click="ignore", icon=":material/table:")


def main() -> None:
    """Build the page."""
    st.set_page_config(page_title="covidxr: chest X-ray research tool", page_icon=":material/radiology:",
                       layout="wide")
    settings = load_settings()
    st.title("Chest X-ray classifier (COVID-19 / normal / pneumonia)")
    st.warning(f"**Intended use:** {INTENDED_USE} Results can be wrong; always rely on a qualified reader.",
               icon=":material/info:")
    chosen, any_name = _sidebar(settings)
    if chosen is None:
        _no_model(settings, None)
        return
    mtime_ns = chosen.stat().st_mtime_ns if chosen.is_file() else 0
    try:
        predictor = load_model(str(chosen), mtime_ns)
    except CovidxrError as exc:
        _no_model(settings, f"The model could not be loaded: {exc}")
        return
    except Exception:  # noqa: BLE001 - never a traceback on the page; details go to the server log
        log.exception("loading %s failed", chosen)
        _no_model(settings, f"The model could not be loaded from {chosen} (unexpected error; see the server log).")
        return
    audit = PredictionLog.resolve(settings.audit_log, chosen)
    st.sidebar.caption(f"Audit log: `{audit.path}`" if audit else "Audit log: off")
    results, model_tab = st.tabs(["Analyse images", "Model and evaluation"])
    with results:
        _results_tab(predictor, f"{chosen}:{mtime_ns}", audit, any_name)
    with model_tab:
        render_model_view(predictor)


main()
