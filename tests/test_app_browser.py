"""End to end: ``streamlit run`` the app, upload a real X-ray and a corrupt file in headless Chromium.

Chromium is Debian's (``/usr/bin/chromium``, or ``$COVIDXR_CHROMIUM``); Playwright's own browser download is not
used. The checkpoint is the tiny trained run, or ``$COVIDXR_APP_CHECKPOINT`` to time a real model. The test prints
the time from the upload to the result being shown and saves a full-page screenshot to test-artifacts/app.png.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, require_chromium, run_app

pytestmark = pytest.mark.browser

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


def test_upload_real_xray_and_corrupt_file(server: tuple[str, Path], shared_data: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, audit = server
    good = real_xray(shared_data)
    corrupt = tmp_path / f"corrupt{good.suffix.lower()}"  # the real file, truncated
    corrupt.write_bytes(good.read_bytes()[:1500])
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
            file_input.set_input_files([good, corrupt])
            expect(page.get_by_text("Model output:", exact=False)).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            heatmap = page.locator("[data-testid='stImage']", has_text="heat map for").locator("img")
            expect(heatmap).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle(),
                                   timeout=RESULT_TIMEOUT_MS)
            error = page.locator("[data-testid='stAlertContentError']", has_text=f"{corrupt.name}:")
            expect(error).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            elapsed = time.perf_counter() - started
            print(f"\nupload to result shown: {elapsed:.2f} s")
            # let the run finish (download buttons are drawn last, the "running" indicator goes away)
            download = page.locator("[data-testid='stDownloadButton']", has_text="Download result (JSON)")
            expect(download).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
            assert "Traceback" not in page.content()
            full_page_screenshot(page, ARTIFACTS / "app.png")
            result = json.loads(download_bytes(page, "Download result (JSON)"))
            assert set(result["prediction"]["probs"]) == {"covid", "normal", "pneumonia"}
            assert download_bytes(page, "Download heat map (PNG)").startswith(b"\x89PNG\r\n\x1a\n")
        finally:
            browser.close()
    assert audit.is_file() and len(audit.read_text().splitlines()) == 1
