"""covidxr clinician page: upload chest X-rays, see the model's output, its Grad-CAM explanation and its evaluation.

Launch (from the repository root)::

    streamlit run app/streamlit_app.py -- --checkpoint runs/resnet50/best.pt [--runs runs] [--audit-log FILE]

or set ``COVIDXR_CHECKPOINT`` / ``COVIDXR_RUNS`` / ``COVIDXR_AUDIT_LOG``. Without a checkpoint the page lists the
``*/best.pt`` files under the runs folder, or explains how to train one. The model is loaded once per process
(``st.cache_resource``, keyed by checkpoint path, site profile and modification times) and shared by all browser
sessions. The sidebar offers the site profiles of the chosen checkpoint (``RUN/sites/NAME/``, made by
``python -m covidxr.adapt``); with one chosen the page says "adapted to NAME from N films on DATE", and the audit log
records the profile with every prediction.
Uploads stay in memory; every prediction is recorded in the audit log (``covidxr.inference.prediction_log``; default
``audit.jsonl`` beside the checkpoint) without names, patient identifiers or the image itself.

The page is thin: reading is ``covidxr.images.reader``, prediction and explanation are ``covidxr.inference.predictor``
and ``covidxr.explain``, the numbers of the model view come from the saved evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from app.analysis import Context, FileResult, Upload, prune
from app.evaluation import Evaluation, load_evaluation
from app.file_view import INTENDED_USE, render_upload
from app.model_view import render_model_view
from app.settings import TRAIN_COMMANDS, AppSettings, checkpoint_choices, load_settings, run_label
from app.summary import results_csv, summary_frame
from covidxr.errors import CovidxrError
from covidxr.images.reader import MAX_FILE_BYTES
from covidxr.inference.prediction_log import PredictionLog, new_session_id
from covidxr.inference.stamp import model_stamp
from covidxr.model.site_profile import site_profiles

if TYPE_CHECKING:  # torch loads with the first model, after the page's first lines are shown
    from covidxr.inference.predictor import Predictor

log = logging.getLogger("covidxr.app")

# Long file names wrap in full (summary table, file boxes; the uploader's own list shortens them, the boxes do not).
# Narrow screens (phones, a split window): tables wrap inside the page instead of scrolling sideways, and the title,
# the intended-use banner and the uploader shrink so that a film's verdict is on the first screen.
NARROW_CSS = """<style>
.st-key-file-summary td:nth-child(1) * { white-space: normal; overflow-wrap: anywhere; }
[class*="st-key-filebox-"] [data-testid="stMarkdownContainer"] p { overflow-wrap: anywhere; }
@media (max-width: 640px) {
  [data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
  .st-key-page-head h1 { font-size: 1.35rem; padding: 0.25rem 0; }
  .st-key-page-head [data-testid="stCaptionContainer"] { display: none; }
  .st-key-page-head [data-testid="stAlert"] p { font-size: 0.75rem; line-height: 1.25; }
  .st-key-page-head [data-testid="stAlertContainer"] { padding: 0.4rem 0.6rem; }
  [data-testid="stFileUploaderDropzone"] { padding: 0.4rem 0.6rem; }
  [data-testid="stFileUploaderDropzoneInstructions"] small { display: none; }
  [data-testid="stTable"] table { font-size: 0.78rem; }
  [data-testid="stTable"] th, [data-testid="stTable"] td { padding: 0.25rem 0.35rem; }
  [data-testid="stTable"] th *, [data-testid="stTable"] td * { overflow-wrap: anywhere; }
  .st-key-file-summary table { table-layout: fixed; width: 100%; font-size: 0.72rem; }
  .st-key-file-summary th:nth-child(1) { width: 24%; } .st-key-file-summary th:nth-child(2) { width: 15%; }
  .st-key-file-summary th:nth-child(3) { width: 17%; } .st-key-file-summary th:nth-child(4) { width: 14%; }
  .st-key-file-summary th *, .st-key-file-summary td * { white-space: normal; word-break: break-word; }
  .st-key-file-summary td:nth-child(1) * { word-break: break-all; }
}
</style>"""
STORE_KEY = "covidxr_store"
SESSION_KEY = "covidxr_session_id"
ANY_NAME_KEY = "accept_any_name"


NO_SITE = "none (unadapted)"


@st.cache_resource(max_entries=4, show_spinner="Loading the model...")
def load_model(path: str, stamp: tuple[int, int], site: str | None = None, site_mtime_ns: int = 0) -> Predictor:
    """Load a checkpoint once per process (the cache key includes the modification times of the checkpoint and its
    calibration sidecar, so a retrained or newly evaluated model reloads with its new threshold).

    The predictor is shared by all sessions; it serialises its own model calls (explanations hook into the model).

    Args:
        path: the checkpoint file.
        stamp: ``covidxr.inference.stamp.model_stamp`` of it (cache key only).
        site: a site profile folder of this checkpoint, or None for the unadapted model.
        site_mtime_ns: the profile's modification time (cache key only).

    Raises:
        CovidxrError: the checkpoint is missing, unsafe or invalid, or the profile is not this checkpoint's.
    """
    from covidxr.inference.predictor import Predictor

    return Predictor.from_checkpoint(path, site=site)


def _session() -> tuple[str, dict]:
    """This browser session's random id and in-memory cache."""
    if SESSION_KEY not in st.session_state:
        st.session_state[SESSION_KEY] = new_session_id()
    if STORE_KEY not in st.session_state:
        st.session_state[STORE_KEY] = {}
    return st.session_state[SESSION_KEY], st.session_state[STORE_KEY]


def _sidebar(settings: AppSettings) -> tuple[Path | None, Path | None]:
    """The model and site choices in the sidebar; returns the chosen checkpoint (or None) and site profile (or
    None)."""
    site = None
    with st.sidebar:
        st.header("Model")
        choices = checkpoint_choices(settings)
        chosen = None
        if choices:
            chosen = st.selectbox("Model (training run)", choices, format_func=run_label,
                                  help="The configured model and the best model of each run folder, by run name.")
            profiles = {p.name: p for p in site_profiles(chosen)}
            picked = st.selectbox("Site (hospital)", [NO_SITE, *profiles], key="site",
                                  help="A site profile adapts the model to a hospital's own films (python -m "
                                       "covidxr.adapt); choose none to run the model as trained.")
            site = profiles.get(picked)
        else:
            st.caption("No checkpoint configured and none found in the runs folder.")
        st.divider()
        st.caption(INTENDED_USE)
    return chosen, site


def _load_with_site(chosen: Path, stamp: tuple[int, int], site: Path | None) -> Predictor:
    """The chosen model, adapted to the chosen site when its profile is usable (else unadapted, with the reason on
    the page); the page says which."""
    if site is not None:
        record = site / "site.json"
        try:
            predictor = load_model(str(chosen), stamp, str(site), record.stat().st_mtime_ns)
        except (CovidxrError, OSError) as exc:
            st.error(f"The site profile {site.name} could not be used ({str(exc).replace(str(site), site.name)}); "
                     "the model runs unadapted.")
        else:
            if predictor.site is not None and predictor.site.adapted:
                st.info(f"Site: {predictor.site.describe()}.", icon=":material/local_hospital:")
            elif predictor.site is not None:
                st.warning(f"Site: {predictor.site.describe()}.")
            return predictor
    return load_model(str(chosen), stamp)


def _no_model(problem: str | None) -> None:
    """Explain how to get a model when none can be loaded."""
    if problem:
        st.error(problem)
    st.subheader("No model loaded yet")
    st.markdown("This page needs a trained checkpoint. From the repository root, train and evaluate one, then "
                "start the page with it:")
    st.code(TRAIN_COMMANDS, language="bash")
    st.markdown("Or set `COVIDXR_CHECKPOINT=path/to/best.pt`, or put run folders (each with a `best.pt`) in the "
                "runs folder (`--runs`, default `runs/`) and pick one in the sidebar.")


def _uploads() -> tuple[list[Upload], bool]:
    """The file uploader and its option; returns the uploaded files (kept in memory) and the option's value."""
    files = st.file_uploader(
        "Chest X-rays (PNG, JPEG, DICOM, ...): one or several frontal views", accept_multiple_files=True,
        max_upload_size=MAX_FILE_BYTES // 2**20, key="uploads",
        help=f"Up to {MAX_FILE_BYTES // 2**20} MB per file. Files stay in memory and are not stored. The content "
             "decides the format, whatever the file name says.")
    any_name = st.checkbox("Accept files without an extension", key=ANY_NAME_KEY,
                           help="DICOM files exported from a PACS often have no .dcm extension. Tick this to read "
                                "them; the content is checked either way.")
    return [Upload(name=f.name, data=f.getvalue(), key=f.file_id) for f in files or []], any_name


def _summary(results: list[FileResult], classes: list[str], ctx: Context) -> None:
    """Audit failures, the table of all files (several files) and the CSV download."""
    for error in dict.fromkeys(ctx.audit_errors):
        st.error(f"Audit log not written: {error}. The predictions below were not recorded.")
    if len(results) > 1:
        st.markdown(f"**{len(results)} files**: " + ", ".join(
            f"{sum(r.verdict == v for r in results)} {v}" for v in ("assessed", "not assessed", "failed")))
        with st.container(key="file-summary"):
            st.table(summary_frame(results), hide_index=True, alt="Summary of all uploaded files: verdict, class, "
                     "probability and the reason a file was not assessed or failed")
    plural = "" if len(results) == 1 else "s"
    st.download_button(f"Download all results as CSV ({len(results)} file{plural})", results_csv(results, classes),
                       file_name="covidxr_results.csv", mime="text/csv", on_click="ignore", icon=":material/table:")


def _results_tab(predictor: Predictor, model_key: str, audit: PredictionLog | None,
                 evaluation: Evaluation | None) -> None:
    """Upload, then a summary of all files at the top, one box per file below it."""
    session_id, store = _session()
    uploads, any_name = _uploads()
    prune(store, uploads, model_key)
    if not uploads:
        st.info("Upload one or more chest X-rays to see the model's output and where it looked.")
        return
    summary = st.container()
    progress = summary.progress(0.0, text=f"Analysing {len(uploads)} files...")
    ctx = Context(predictor, model_key, audit, session_id, store, any_name)
    results: list[FileResult] = []
    for index, upload in enumerate(uploads):
        progress.progress(index / len(uploads), text=f"Analysing {upload.name} ({index + 1} of {len(uploads)})")
        results.append(render_upload(upload, ctx, evaluation))
    progress.empty()
    with summary:
        _summary(results, list(predictor.classes), ctx)


def main() -> None:
    """Build the page."""
    st.set_page_config(page_title="covidxr: chest X-ray research tool", page_icon=":material/radiology:",
                       layout="wide")
    settings = load_settings()
    st.html(NARROW_CSS)
    with st.container(key="page-head"):
        st.title("Chest X-ray classifier", anchor=False)
        st.caption("COVID-19 / normal / pneumonia from a frontal chest radiograph, with a Grad-CAM heat map")
        st.warning(f"**Intended use:** {INTENDED_USE} Results can be wrong; always rely on a qualified reader.",
                   icon=":material/info:")
    chosen, site = _sidebar(settings)
    if chosen is None:
        _no_model(None)
        return
    stamp = model_stamp(chosen)
    try:
        predictor = _load_with_site(chosen, stamp, site)
    except CovidxrError as exc:
        _no_model(f"The model could not be loaded: {str(exc).replace(str(chosen), chosen.name)}")
        return
    except Exception:  # noqa: BLE001 - never a traceback on the page; details go to the server log
        log.exception("loading %s failed", chosen)
        _no_model(f"The model could not be loaded from {chosen.name} (unexpected error; see the server log).")
        return
    audit = PredictionLog.resolve(settings.audit_log, chosen)
    st.sidebar.caption("Audit log: on (no names, no patient data)" if audit else "Audit log: off")
    evaluation = load_evaluation(predictor)
    results, model_tab = st.tabs(["Analyse images", "Model and evaluation"])
    with results:
        _results_tab(predictor, f"{chosen}:{stamp}:{site}", audit, evaluation)
    with model_tab:
        render_model_view(predictor, evaluation)


main()
