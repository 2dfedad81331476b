"""In Chromium: the page says one thing, the same way everywhere (issue 30).

One film's decision reads the same in its headline, the summary table, the results CSV, the result JSON, the heat-map
PNG's caption, the DICOM SR and the audit log; a film far from the threshold carries no caution; the model tab's
plain summary fits 1280 x 900 and no internal figure sits under the external heading; a refusal is a red box with an
icon and says so in words; at 400 px the verdict is on the first screen. The model is the tiny trained run, with a
shipped COVID threshold and a saved evaluation (made-up numbers, tests/app_inputs.py); the threshold is placed next
to the DICOM film's COVID probability, so that film has a caution and the other one has none.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from app_inputs import fake_evaluation, lateral_dicom, ship_threshold, sr_conclusion, write_evaluation
from app_server import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, AppServer, require_chromium, run_app
from PIL import Image

from covidxr.images.reader import load_xray
from covidxr.inference.decision import NEAR, NEAR_THRESHOLD
from covidxr.inference.prediction_log import pixel_sha256, read_records

pytestmark = [pytest.mark.browser, pytest.mark.slow]
DECISION = re.compile(r"^COVID: (yes|no; most likely \w+)(; caution: .+)?$")


def _covid(predictor: object, path: Path) -> float:
    return predictor.predict(load_xray(path), cam=None).probs["covid"]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served(tiny_run: Path, shared_data: Path, shared_dicom_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppServer, Path, Path]]:
    """The app on a copy of the tiny run, its threshold 0.01 from the DICOM film's COVID probability (away from a
    frontal film whose probability differs by more than the caution margin); yields the server and the two films."""
    from covidxr.files import file_digest
    from covidxr.inference.predictor import Predictor

    require_chromium()
    folder = tmp_path_factory.mktemp("decision")
    run = folder / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "audit*"))
    predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu", backend="torch")
    film = sorted(shared_dicom_dir.glob("rsna*.dcm"))[0]
    p_film = _covid(predictor, film)
    meta = pd.read_csv(shared_data / "metadata.csv", dtype=str, keep_default_na=False)
    candidates = [shared_data / p for p in meta.groupby("label").head(8)["path"]]
    other = max(candidates, key=lambda p: abs(_covid(predictor, p) - p_film))
    gap = _covid(predictor, other) - p_film
    assert abs(gap) > NEAR_THRESHOLD + 0.02, (p_film, gap)  # a film far enough from the DICOM film exists
    sha = file_digest(run / "best.pt")
    threshold = p_film - 0.01 if gap > 0 else p_film + 0.01  # away from `other`
    ship_threshold(run, sha, threshold)
    write_evaluation(run, fake_evaluation(list(predictor.classes), sha, external=True, threshold=threshold))
    (folder / "server").mkdir()
    with run_app(run / "best.pt", folder / "server") as app:
        yield app, film, other


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def upload(page: object, url: str, files: list[Path]) -> None:
    """Open the page, upload ``files``, wait until the run has finished (the "running" indicator is gone)."""
    from playwright.sync_api import expect

    page.goto(url)  # type: ignore[attr-defined]
    file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")  # type: ignore[attr-defined]
    expect(file_input).to_be_attached(timeout=RESULT_TIMEOUT_MS)
    file_input.set_input_files(files)
    expect(page.locator("[data-testid='stDownloadButton']", has_text="CSV")).to_be_visible(  # type: ignore
        timeout=RESULT_TIMEOUT_MS)
    expect(page.locator("[data-testid='stStatusWidget']")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)  # type: ignore


def box(page: object, name: str) -> object:
    """The box of one uploaded file."""
    return page.locator("div[class*='st-key-filebox-']").filter(  # type: ignore[attr-defined]
        has=page.get_by_text(f"File: {name}", exact=True))  # type: ignore[attr-defined]


def download(page: object, where: object, label: str) -> bytes:
    """Click a download button inside ``where`` and return the file's content."""
    with page.expect_download(timeout=RESULT_TIMEOUT_MS) as info:  # type: ignore[attr-defined]
        where.locator("[data-testid='stDownloadButton']", has_text=label).first.click()  # type: ignore
    return Path(info.value.path()).read_bytes()


def test_one_film_says_the_same_everywhere_and_a_film_without_caution_shows_none(
        served: tuple[AppServer, Path, Path], browser: object) -> None:
    app, film, other = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    upload(page, app.url, [film, other])
    titles = {}
    for path in (film, other):
        heading = box(page, path.name).get_by_role("heading", name=re.compile("^COVID: "))  # type: ignore
        titles[path.name] = heading.inner_text().strip()
        assert DECISION.match(titles[path.name]), titles
    cautious = titles[film.name]
    assert cautious.endswith(f"; caution: {NEAR}"), cautious
    assert "caution" not in titles[other.name]
    other_text = box(page, other.name).inner_text()  # type: ignore[attr-defined]
    assert "Close to the threshold" not in other_text and "Unusual film" not in other_text
    assert "On 199 films from hospitals it never saw, it found 76 of 99 COVID films" in other_text

    summary = page.locator("[data-testid='stTable']", has_text="Verdict")  # type: ignore[attr-defined]
    rows = {r.locator("td").first.inner_text().strip(): [c.inner_text().strip() for c in r.locator("td").all()]
            for r in summary.locator("tbody tr").all()}
    assert {name: row[2] for name, row in rows.items()} == titles
    table = pd.read_csv(io.BytesIO(download(page, page, "Download all results as CSV")), keep_default_na=False)
    assert dict(zip(table["file"], table["decision"], strict=True)) == titles
    where = box(page, film.name)
    result = json.loads(download(page, where, "Download result (JSON)"))
    assert result["decision"]["text"] == cautious and result["decision"]["cautions"] == [NEAR]
    png = Image.open(io.BytesIO(download(page, where, "Download heat map (PNG)")))
    assert png.text["Description"].split("\n")[0] == cautious
    archive = zipfile.ZipFile(io.BytesIO(download(page, where, "Download as DICOM")))
    assert sr_conclusion(archive.read(f"{film.stem}_sr.dcm")) == cautious
    # the audit log records the same words as the headline, for the film with a caution and the one without
    logged = {r["image_sha256"]: r for r in read_records(app.audit) if r["event"] == "prediction"}
    for path in (film, other):
        record = logged[pixel_sha256(load_xray(path).pixels)]
        assert record["decision"]["text"] == titles[path.name], (record["decision"], titles)
    assert logged[pixel_sha256(load_xray(film).pixels)]["decision"]["cautions"] == [NEAR]


def test_model_tab_summary_fits_one_screen_without_internal_figures_under_the_external_heading(
        served: tuple[AppServer, Path, Path], browser: object) -> None:
    from playwright.sync_api import expect

    app, _, _ = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.goto(app.url)
    page.get_by_role("tab", name="Model and evaluation").click()
    summary = page.locator(".st-key-model-summary")
    expect(summary).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    text = summary.inner_text()
    for part in ("Trained on:", "On hospitals it never saw:", "How it answers:", "What it cannot do:"):
        assert part in text, text
    assert "found 76 of 99 COVID films" in text
    box_ = summary.bounding_box()
    assert box_["y"] >= 0 and box_["y"] + box_["height"] <= 900, box_  # on the first screen, no scrolling
    assert page.locator("[data-testid='stTable']").filter(visible=True).count() == 0  # the tables are folded
    external = page.locator("[data-testid='stExpander']", has_text="On films from sources it never saw")
    external.locator("summary").click()
    expect(external.get_by_text("External validation:", exact=False)).to_be_visible()
    inside = external.inner_text()
    assert "Never seen in training" in inside and "left out of training" in inside
    assert "Internal test" not in inside and "0.89" not in inside  # the internal COVID AUC stays under its heading
    assert "not set here" not in inside and "External: external" not in inside
    assert "below chance" in inside or "at chance" in inside or "better than chance" in inside


def test_a_refusal_is_red_with_an_icon_and_at_400_px_the_verdict_is_on_the_first_screen(
        served: tuple[AppServer, Path, Path], browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    app, film, other = served
    lateral = tmp_path / "lateral.dcm"
    lateral.write_bytes(lateral_dicom())
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    upload(page, app.url, [other, lateral])
    refused = page.get_by_role("heading", name=re.compile("^Not assessed: "))
    expect(refused).to_have_count(1)
    assessed = page.get_by_role("heading", name=re.compile("^COVID: "))
    alert = box(page, lateral.name).locator("[data-testid='stAlertContainer']").filter(has=refused)
    expect(alert).to_have_count(1)
    colour = alert.evaluate("e => getComputedStyle(e).backgroundColor")
    red, green, blue = map(int, re.findall(r"\d+", colour)[:3])
    assert red > green + 8 and red > blue + 8, colour  # a red box
    ink = [h.evaluate("e => getComputedStyle(e).color") for h in (refused, assessed.first)]
    red, green, blue = map(int, re.findall(r"\d+", ink[0])[:3])
    assert red > green + 40 and red > blue + 40 and ink[0] != ink[1], ink  # red words, unlike the answer's
    assert assessed.evaluate("e => e.closest('[data-testid=stAlertContainer]')") is None  # the answer is not boxed
    assert alert.locator("[data-testid='stAlertDynamicIcon'], [data-testid='stIconMaterial']").count() >= 1
    assert "OSError" not in page.content() and "Error:" not in box(page, lateral.name).inner_text()

    narrow = browser.new_page(viewport={"width": 400, "height": 800})  # type: ignore[attr-defined]
    upload(narrow, app.url, [film])
    title = narrow.get_by_role("heading", name=re.compile("^COVID: "))
    expect(title).to_be_visible()
    assert narrow.evaluate("() => document.querySelector('[data-testid=stMain]')?.scrollTop || 0") == 0
    where = title.bounding_box()
    assert where["y"] + where["height"] <= 800, where  # the verdict on the first screen, before any scrolling
