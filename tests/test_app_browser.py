"""End to end: ``streamlit run`` the app, upload a real X-ray, a corrupt file and a lateral film in headless Chromium.

Chromium is Debian's (``/usr/bin/chromium``, or ``$COVIDXR_CHROMIUM``); Playwright's own browser download is not
used. The checkpoint is the tiny trained run, or ``$COVIDXR_APP_CHECKPOINT`` to time a real model. The test prints
the time from the upload to the result being shown and saves a full-page screenshot to test-artifacts/app.png.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_inputs import NOTCXR, lateral_dicom, rotated_png, sr_conclusion
from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, require_chromium, run_app
from PIL import Image

from covidxr.explain.display import display_size
from covidxr.images.reader import load_xray
from covidxr.inference.prediction_log import read_records

pytestmark = [pytest.mark.browser, pytest.mark.slow]
DOWNLOAD_MAX_SIDE = 2048  # app.heatmap.DOWNLOAD_MAX_SIDE
LATERALS = NOTCXR / "lateral"

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """``$COVIDXR_APP_CHECKPOINT`` if set, else the tiny trained run's best.pt."""
    chosen = os.environ.get("COVIDXR_APP_CHECKPOINT")
    return Path(chosen) if chosen else request.getfixturevalue("tiny_run") / "best.pt"


@pytest.fixture
def server(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A running ``streamlit run`` of the app; yields its URL and its audit log."""
    require_chromium()
    with run_app(checkpoint, tmp_path) as app:
        yield app.url, app.audit


def real_xray(data: Path) -> Path:
    """A real chest X-ray from the shared data."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    return data / meta[meta["label"] == "pneumonia"]["path"].iloc[0]


def full_page_screenshot(page: object, path: Path) -> None:
    """Screenshot the whole page; Streamlit scrolls inside its main section, so the viewport is made tall enough."""
    height = page.evaluate(  # type: ignore[attr-defined]
        "() => Math.max(document.body.scrollHeight,"
        " ...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
        ".map(e => e.scrollHeight))")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 16000)})  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # type: ignore[attr-defined]  # let the layout settle after the resize
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]


def download_bytes(page: object, label: str) -> bytes:
    """Click a download button and return the downloaded file's content."""
    with page.expect_download(timeout=RESULT_TIMEOUT_MS) as info:  # type: ignore[attr-defined]
        page.locator("[data-testid='stDownloadButton']", has_text=label).first.click()  # type: ignore[attr-defined]
    return Path(info.value.path()).read_bytes()


def file_box(page: object, name: str) -> object:
    """The box of one uploaded file, found by the file name it shows."""
    return page.locator("div[class*='st-key-filebox-']").filter(  # type: ignore[attr-defined]
        has=page.get_by_text(f"File: {name}", exact=True))  # type: ignore[attr-defined]


def upload_and_wait(page: object, url: str, files: list[Path]) -> object:
    """Open the page, upload ``files`` and wait until the run has finished; returns the summary table."""
    from playwright.sync_api import expect

    page.goto(url)  # type: ignore[attr-defined]
    file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")  # type: ignore[attr-defined]
    expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
    file_input.set_input_files(files)
    summary = page.locator("[data-testid='stTable']", has_text="Verdict")  # type: ignore[attr-defined]
    expect(summary).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(  # type: ignore[attr-defined]
        0, timeout=RESULT_TIMEOUT_MS)
    return summary


def caption_margin(png: Image.Image, image_shape: tuple[int, int]) -> np.ndarray:
    """What the app draws below an overlay of ``image_shape`` for the caption in ``png``'s Description chunk."""
    from covidxr.explain.display import captioned, display_size

    height, width = display_size(*image_shape, DOWNLOAD_MAX_SIDE)
    blank = np.zeros((height, width, 3), np.uint8)
    return captioned(blank, png.text["Description"].split("\n"))[height:]


def test_several_files_refused_failed_and_downloads(server: tuple[str, Path], shared_data: Path,
                                                    tmp_path: Path) -> None:
    """A real film, a truncated copy and a lateral film: one headline, one 'Not assessed' without probability, one
    error; the summary table lists all three; the downloaded heat map carries its colour bar and caption."""
    from playwright.sync_api import expect, sync_playwright

    url, audit = server
    good = real_xray(shared_data)
    corrupt = tmp_path / f"corrupt{good.suffix.lower()}"  # the real file, truncated
    corrupt.write_bytes(good.read_bytes()[:1500])
    lateral = tmp_path / "lateral.dcm"  # a real lateral film; its header says LL
    lateral.write_bytes(lateral_dicom())
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.get_by_text("Intended use", exact=False)).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)  # after the model has loaded
            started = time.perf_counter()
            file_input.set_input_files([good, corrupt, lateral])
            expect(page.get_by_role("heading", name=re.compile("^COVID: "))).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            heatmap = page.locator("[data-testid='stImage']", has_text="heat map for").locator("img")
            expect(heatmap).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle(),
                                   timeout=RESULT_TIMEOUT_MS)
            error = page.locator("[data-testid='stAlertContentError']", has_text=f"{corrupt.name}:")
            expect(error).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            print(f"\nupload to result shown: {time.perf_counter() - started:.2f} s")
            # let the run finish (the summary is drawn last, the "running" indicator goes away)
            summary = page.locator("[data-testid='stTable']", has_text="Verdict")
            expect(summary).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
            assert "Traceback" not in page.content()

            refused = page.get_by_role("heading", name=re.compile("^Not assessed: "))
            expect(refused).to_have_count(1)
            assert "lateral" in refused.inner_text()
            box = file_box(page, lateral.name)
            assert "COVID: " not in box.inner_text() and "Probabilities:" not in box.inner_text()
            assert not re.search(r"\d%", box.inner_text()), box.inner_text()  # no probability anywhere in it
            expect(page.get_by_text("Probabilities: ", exact=False)).to_have_count(1)
            rows = summary.locator("tbody tr")
            expect(rows).to_have_count(3)
            cells = [[c.inner_text().strip() for c in r.locator("td, th").all()] for r in rows.all()]
            table = {row[0]: row[1:] for row in cells}  # file: verdict, class, probability, reason or error
            assert table[good.name][0] == "assessed" and table[good.name][1].startswith("COVID: ")
            assert re.fullmatch(r"(> 99|< 1|\d{1,2})%", table[good.name][2])
            assert table[corrupt.name][:3] == ["failed", "", ""] and "truncated" in table[corrupt.name][3]
            assert table[lateral.name][:3] == ["not assessed", "", ""] and "lateral" in table[lateral.name][3]
            full_page_screenshot(page, ARTIFACTS / "app.png")

            result = json.loads(download_bytes(page, "Download result (JSON)"))
            assert set(result["prediction"]["probs"]) == {"covid", "normal", "pneumonia"}
            png = Image.open(io.BytesIO(download_bytes(page, "Download heat map (PNG)")))
            assert png.format == "PNG"
            caption = png.text["Description"]
            assert caption.startswith("COVID: ") and "Grad-CAM heat map for '" in caption
            assert "Research use only" in caption and datetime.now(UTC).strftime("%Y-%m-%d") in caption
            shape = load_xray(good).pixels.shape
            margin = caption_margin(png, shape)
            drawn = np.asarray(png.convert("RGB"))
            assert drawn.shape[0] == margin.shape[0] + display_size(*shape, DOWNLOAD_MAX_SIDE)[0]
            assert (drawn[-margin.shape[0]:] == margin).all()  # colour bar and caption text, pixel for pixel
            assert (margin < 100).any(axis=2).sum() > 500  # and there is dark text in it
        finally:
            browser.close()
    records = read_records(audit)
    assert [r["event"] for r in records] == ["prediction", "prediction"]
    assert [r["verdict"]["assessable"] for r in records] == [True, False]


GATE_SIZE = 96  # network input side of the gated model: quick on a CPU, enough for the gate to tell views apart


@pytest.fixture(scope="module")
def gated_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet EfficientNet-Lite0 (untrained head: the gate needs only the backbone) as a run of real films split
    by patient, with its input gate fitted by ``python -m covidxr.gate fit`` (as tests/test_gate.py does)."""
    from conftest import fit_gated_run

    return fit_gated_run(shared_data, tmp_path_factory.mktemp("gated-run"), GATE_SIZE)


def test_the_input_gate_refuses_a_rotated_and_a_lateral_film(gated_run: Path, tmp_path: Path) -> None:
    """With a fitted gate, a frontal film turned by np.rot90 and a real lateral film (one the gate was not fitted on)
    are 'Not assessed' by the learned view check, with no class or probability; the upright film is assessed."""
    from playwright.sync_api import expect, sync_playwright

    from covidxr.data.manifest import load_manifest
    from covidxr.data.split import apply_split
    from covidxr.inference.predictor import Predictor

    require_chromium()
    table = apply_split(load_manifest(gated_run / "manifest.csv"), gated_run / "split.csv")
    upright = Path(table[table["split"] == "test"]["path"].iloc[0])
    rotated = tmp_path / "rotated.png"
    rotated.write_bytes(rotated_png(upright))
    info = Predictor.from_checkpoint(gated_run / "best.pt", device="cpu", backend="torch").gate.info
    lateral = LATERALS / Path(info["lateral_holdout"][0]).name
    assert lateral.is_file(), info["lateral_holdout"][:3]
    (tmp_path / "server").mkdir()
    with run_app(gated_run / "best.pt", tmp_path / "server") as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            summary = upload_and_wait(page, app.url, [upright, rotated, lateral])
            full_page_screenshot(page, ARTIFACTS / "app-gate.png")
            refused = page.get_by_role("heading", name=re.compile("^Not assessed: "))
            expect(refused).to_have_count(2)
            texts = refused.all_inner_texts()
            assert "This film looks rotated" in texts[0] and "side (lateral) view" in texts[1], texts
            for name in (rotated.name, lateral.name):
                box = file_box(page, name)
                assert "COVID: " not in box.inner_text() and not re.search(r"\d%", box.inner_text())
                assert "file and learned checks" in box.inner_text()
            expect(page.get_by_role("heading", name=re.compile("^COVID: "))).to_have_count(1)
            rows = {r.locator("td").first.inner_text().strip(): [c.inner_text().strip() for c in r.locator("td").all()]
                    for r in summary.locator("tbody tr").all()}
            assert rows[upright.name][1] == "assessed"
            assert rows[rotated.name][1:4] == ["not assessed", "", ""] and "rotated" in rows[rotated.name][4]
            assert rows[lateral.name][1:4] == ["not assessed", "", ""] and "lateral" in rows[lateral.name][4]
        finally:
            browser.close()
    records = read_records(tmp_path / "server" / "audit.jsonl")
    assert [r["verdict"]["assessable"] for r in records] == [True, False, False]
    assert records[1]["verdict"]["by"] == "file and learned checks" and records[1]["verdict"]["view_probs"]


def test_dicom_download_holds_the_labelled_heat_map_and_the_report(server: tuple[str, Path],
                                                                    shared_dicom_dir: Path) -> None:
    """A real DICOM upload: "Download as DICOM" gives a ZIP whose Secondary Capture is the heat-map PNG download,
    pixel for pixel, and whose SR reports the shown output, both in the upload's study."""
    import zipfile

    import pydicom
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    film = sorted(shared_dicom_dir.glob("*.dcm"))[0]
    source = pydicom.dcmread(film, stop_before_pixels=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
            file_input.set_input_files([film])
            title = page.get_by_role("heading", name=re.compile("^COVID: "))
            expect(title).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
            headline = title.inner_text().strip()
            png = np.asarray(Image.open(io.BytesIO(download_bytes(page, "Download heat map (PNG)"))).convert("RGB"))
            archive = zipfile.ZipFile(io.BytesIO(download_bytes(page, "Download as DICOM")))
        finally:
            browser.close()
    stem = film.stem
    assert sorted(archive.namelist()) == [f"{stem}_sc.dcm", f"{stem}_sr.dcm"]
    capture = pydicom.dcmread(io.BytesIO(archive.read(f"{stem}_sc.dcm")))
    report = pydicom.dcmread(io.BytesIO(archive.read(f"{stem}_sr.dcm")))
    assert np.array_equal(capture.pixel_array, png)
    assert capture.StudyInstanceUID == report.StudyInstanceUID == source.StudyInstanceUID
    assert capture.PatientID == report.PatientID == source.PatientID
    assert sr_conclusion(archive.read(f"{stem}_sr.dcm")) == headline


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/+=~-])/(?:[\w.+@-]+/)+[\w.+@-]+")


def _borderline_film(predictor: object, folders: list[Path]) -> Path:
    """A frontal film from hospitals the gated model never saw whose distance lies in the borderline band."""
    for folder in folders:
        meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
        paths = [folder / p for p in meta["path"]]
        for start in range(0, len(paths), 32):
            batch = paths[start:start + 32]
            for path, prediction in zip(batch, predictor.predict_batch(  # type: ignore[attr-defined]
                    [load_xray(p) for p in batch], cam=None), strict=True):
                if prediction.gate.borderline:
                    return path
    raise AssertionError("no frontal film of external/ or siim/ lands in the gate's borderline band")


def test_ct_slice_borderline_film_and_no_server_paths(gated_run: Path, shared_data: Path, tmp_path: Path) -> None:
    """A held-out CT slice is refused with a reason that names CT; a frontal film from an unseen hospital in the
    borderline band is shown and marked, not refused; at 400 px the verdict comes before the image; no page text,
    alt text or offered download (report, results CSV, result JSON) holds an absolute server path."""
    import shutil

    from app_inputs import fake_evaluation, write_evaluation
    from playwright.sync_api import expect, sync_playwright

    from covidxr.inference.gate_fit import main as gate
    from covidxr.inference.predictor import Predictor

    require_chromium()
    run = tmp_path / "efficientnet_lite0-gated"
    shutil.copytree(gated_run, run)  # its own copy: the evaluation written below stays out of the other tests
    # 44 validation films at 96 px put the 0.99 threshold at the largest validation distance, far above every real
    # film; a 0.8 quantile makes a band that real films from unseen hospitals land in (11 of the first 64 external).
    assert gate(["fit", "--checkpoint", str(run / "best.pt"), "--laterals", str(NOTCXR / "lateral"), "--ct",
                 str(NOTCXR / "ct"), "--device", "cpu", "--made", "60", "--alpha", "0.2"]) == 0
    predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch")
    info = predictor.gate.info
    held_out = [NOTCXR / "ct" / Path(name).name for name in info["ct_holdout"]]
    verdicts = [p.gate for p in predictor.predict_batch([load_xray(p) for p in held_out], cam=None)]
    named_ct = [path for path, v in zip(held_out, verdicts, strict=True) if v.checks[:1] == ("ct",)]
    assert len(named_ct) >= len(held_out) / 2, [v.checks for v in verdicts]  # the gate names CT for most of them
    ct_slice = named_ct[0]
    borderline = _borderline_film(predictor, [shared_data.parent / "external", shared_data.parent / "siim"])
    evaluation = fake_evaluation(list(predictor.classes), predictor.checkpoint_sha256, external=True)
    write_evaluation(run, evaluation)
    (run / "eval" / "report.html").write_text(f"<html><body><p>checkpoint {run / 'best.pt'}</p><p>data "
                                              f"{shared_data / 'metadata.csv'}</p></body></html>")
    secrets = [str(run), str(shared_data), str(REPO), str(tmp_path)]
    (tmp_path / "server").mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    with run_app(run / "best.pt", tmp_path / "server") as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            upload_and_wait(page, app.url, [ct_slice, borderline])
            refused = page.get_by_role("heading", name=re.compile("^Not assessed: "))
            expect(refused).to_have_count(1)
            assert refused.inner_text() == "Not assessed: This looks like a CT slice, not a chest X-ray"
            ct_box = file_box(page, ct_slice.name)
            assert not re.search(r"\d%", ct_box.inner_text()) and "feature distance" not in ct_box.inner_text()
            ct_alt = ct_box.locator("img").first.get_attribute("alt") or ""
            assert ct_alt.startswith("The uploaded image, not assessed (This looks like a CT slice"), ct_alt
            box = file_box(page, borderline.name)
            text = box.inner_text()
            assert "Unusual film: read with care" in text and "Not assessed" not in text, text
            title = box.get_by_role("heading", name=re.compile("^COVID: "))
            expect(title).to_have_count(1)
            assert "caution: " in title.inner_text() and "unusual film" in title.inner_text()
            assert re.search(r"COVID probability (> 99|< 1|\d+)%", text)
            alts = [a or "" for a in box.locator("img").evaluate_all("els => els.map(e => e.alt)")]
            assert any(a.startswith("The uploaded chest X-ray, marked as an unusual film") for a in alts), alts
            assert any("heat map for the class" in a for a in alts), alts
            full_page_screenshot(page, ARTIFACTS / "app-ct-borderline.png")

            page.set_viewport_size({"width": 400, "height": 900})
            expect(title).to_be_visible()
            title_y = title.bounding_box()["y"]
            image_y = box.locator("[data-testid='stImage']").first.bounding_box()["y"]
            assert title_y < image_y, (title_y, image_y)  # the verdict before the images
            collapse = page.locator("[data-testid='stSidebarCollapseButton'] button")
            if collapse.count():  # the sidebar stays open after the resize; a phone starts with it closed
                collapse.first.click()
            title.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "app-400px.png"), full_page=False)

            page.set_viewport_size({"width": 1280, "height": 1000})
            offered = [download_bytes(page, "Download all results as CSV"),
                       download_bytes(page, "Download result (JSON)")]
            page.get_by_role("tab", name="Model and evaluation").click()
            page.locator("[data-testid='stExpander']", has_text="On films from sources it never saw").locator(
                "summary").click()  # the details are folded under the summary
            expect(page.get_by_text("External validation:", exact=False).first).to_be_visible()
            offered.append(download_bytes(page, "Download the full evaluation report"))
            texts = [page.evaluate("() => document.body.innerText"),
                     " ".join(page.locator("img").evaluate_all("els => els.map(e => e.alt)")), *(
                         b.decode("utf-8", errors="replace") for b in offered)]
            for where, content in zip(["page", "alt texts", "CSV", "JSON", "report"], texts, strict=True):
                assert not any(secret in content for secret in secrets), where
                assert not ABSOLUTE_PATH.search(content), (where, ABSOLUTE_PATH.search(content))
            assert "checkpoint best.pt" in texts[-1]  # the report keeps the names
        finally:
            browser.close()
