"""The documentation's screenshot of the page, made from a real run: ``streamlit run`` the app, upload a real chest
X-ray from the shared data in headless Chromium, and save what the page shows to docs/images/app-result.png.

Every run makes the picture and checks it; only when asked (``COVIDXR_DOCS_SCREENSHOTS=1``) does it replace the
committed file::

    COVIDXR_DOCS_SCREENSHOTS=1 COVIDXR_DOCS_CHECKPOINT=RUN/best.pt python -m pytest -q tests/test_docs_screenshot.py

The checkpoint is ``$COVIDXR_DOCS_CHECKPOINT`` (a trained model: the picture is meant to show a real result), else the
tests' tiny run. The film is ``$COVIDXR_DOCS_FILM`` or the first pneumonia film of the shared data's metadata.csv
under CC BY 4.0 (a licence that lets the picture be committed with a credit; the docs' caption gives it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, require_chromium, run_app
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SHOT = REPO / "docs" / "images" / "app-result.png"
MAX_BYTES = 300_000  # the repository keeps the picture small
WIDTH = 1000  # pixels of the saved picture


def chosen_film(data: Path) -> tuple[Path, str]:
    """``$COVIDXR_DOCS_FILM``, else the first pneumonia film of ``data/metadata.csv`` under CC BY 4.0; and its
    licence."""
    if os.environ.get("COVIDXR_DOCS_FILM"):
        return Path(os.environ["COVIDXR_DOCS_FILM"]), "as given"
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    row = meta[(meta["label"] == "pneumonia") & meta["license"].str.startswith("CC BY 4.0")].iloc[0]
    return data / row["path"], row["license"]


def small_png(png: bytes) -> bytes:
    """``png`` scaled to ``WIDTH`` pixels and stored with a 256-colour palette."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_screenshot_of_a_real_result(request: pytest.FixtureRequest, shared_data: Path, tmp_path: Path) -> None:
    """The page shows a headline, the probabilities and a heat map for a real film; the picture of that box is saved."""
    from playwright.sync_api import expect, sync_playwright

    require_chromium()
    chosen = os.environ.get("COVIDXR_DOCS_CHECKPOINT")
    checkpoint = Path(chosen) if chosen else request.getfixturevalue("tiny_run") / "best.pt"
    film, licence = chosen_film(shared_data)
    with run_app(checkpoint, tmp_path) as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(app.url)
            file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
            file_input.set_input_files([film])
            heatmap = page.locator("[data-testid='stImage']", has_text="heat map for").locator("img")
            expect(heatmap).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle(),
                                   timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
            assert "Traceback" not in page.content()
            box = page.locator("div[class*='st-key-filebox-']").first
            expect(box).to_contain_text("Probabilities")
            # Streamlit scrolls inside its main section: make the window tall enough to hold the whole box
            height = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], "
                                   "[data-testid=stAppViewContainer]')].map(e => e.scrollHeight))")
            page.set_viewport_size({"width": 1280, "height": min(int(height) + 40, 8000)})
            png = small_png(box.screenshot())
        finally:
            browser.close()
    assert len(png) < MAX_BYTES, f"{len(png)} bytes"
    assert 0 < Image.open(io.BytesIO(png)).size[0] <= WIDTH
    target = SHOT if os.environ.get("COVIDXR_DOCS_SCREENSHOTS") == "1" else tmp_path / SHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)
    print(f"\nwrote {target} ({len(png) // 1024} KB) from {film.name} ({licence}) with {checkpoint}")
