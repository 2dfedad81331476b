"""Many users, no leaks: concurrent browser sessions against one ``streamlit run`` of the app.

One server (the tiny trained run, audit log in tmp), one headless Chromium with :data:`SESSIONS` browser contexts
driven at the same time (Playwright's async API, ``asyncio.gather``). Each session owns :data:`GROUPS_PER_SESSION`
groups of :data:`FILES_PER_SESSION` real chest X-rays that no other session uploads. In every round a session
uploads one of its groups, waits for the results, checks that its page shows exactly its own files with the class
and probabilities that ``covidxr.predict.Predictor`` gives for those files in this process (same checkpoint, no
CAM), then removes them. No two of the images show the same probabilities, so a result delivered to the wrong
session fails on its numbers as on its name. All sessions start the first round at the same moment; it
also downloads each session's CSV of results and compares it at full precision. After that the sessions run their
rounds freely, each as the server answers it.

Memory: the server's resident set (process and children, psutil) is sampled once the pages have loaded, after the
:data:`WARMUP_ROUNDS` warm-up rounds and at the end, each time with every session idle and its files removed (and
every 2 s meanwhile, for the peak). Growth from the end of the warm-up to the end must stay under
:data:`RSS_GROWTH_LIMIT_MB`. The server runs with glibc's mmap threshold fixed (:data:`MALLOC_ENV`), so RSS follows
the memory in use rather than allocator slack. Per upload the server holds the file's bytes, its decoded float32
pixels and a float32 heat map of the same size, two display images and a chart: about 8 bytes per pixel, several MB
for these images (mean megapixels printed). The limit is under 1 MB per upload after the warm-up, so keeping any of
these arrays of each upload after its removal fails the test.

The audit log must hold exactly one record per upload, from :data:`SESSIONS` distinct session ids, each holding
exactly the images of one session, with the probabilities the predictor gives.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from app_server import CHROMIUM, CHROMIUM_ARGS, REPO, RESULT_TIMEOUT_MS, AppServer, require_chromium, run_app

from app.assessment import assess
from covidxr.images.reader import MAX_FILE_BYTES, load_xray
from covidxr.inference.prediction_log import pixel_sha256, read_records

SESSIONS = 8
FILES_PER_SESSION = 3
GROUPS_PER_SESSION = 2  # a session alternates between its own two groups of files
ROUNDS = 8  # SESSIONS * FILES_PER_SESSION * ROUNDS = 192 uploads
WARMUP_ROUNDS = 2
POLL_MS = 100  # how often a page is checked for its results (Playwright's expect backs off to 1 s)
RSS_GROWTH_LIMIT_MB = 100
# glibc otherwise raises its mmap threshold after the first large free (up to 32 MB), so later image buffers come
# from per-thread arenas and RSS becomes the high-water mark of the busiest round (measured: +-150 MB between
# identical rounds) instead of the memory still in use. A fixed threshold returns freed image buffers to the system;
# a leaked buffer stays resident either way, so this makes the measurement sharper, not more lenient.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
MIN_PROB_GAP = 0.002  # any two chosen images differ by >= 0.2 percentage points in some class (page shows 0.1)
PERCENT = r"(?:([<>]) )?(\d+(?:\.\d+)?)%"  # the page's probabilities: "37.4%", or "< 1%" / "> 99%" at the ends
PAGE_TOLERANCE = 0.051  # percentage points: the page rounds to 0.1
CSV_TOLERANCE = 1e-4  # probability: CSV at full precision; CAM forward vs. plain forward
UPLOAD_INPUT = "[data-testid='stFileUploaderDropzoneInput']"
REMOVE_ALL_JS = """() => {
  const buttons = [...document.querySelectorAll('button[aria-label^="Remove "]')];
  buttons.forEach(b => b.click());
  return buttons.length;
}"""
# Spinners and the running indicator animate while sessions wait for the shared model; eight pages repainting them
# cost the browser a third of its CPU time on this 2-core machine. The server's work is the same without them.
NO_ANIMATIONS_JS = """document.addEventListener("DOMContentLoaded", () => {
  const style = document.createElement("style");
  style.textContent = "*, *::before, *::after { animation: none !important; transition: none !important; }";
  document.head.appendChild(style);
});"""
# When the page shows all the given file names, as many probability captions and as many headlines (the headline is
# drawn after the heat map, so the captions alone may come before it) and no script is running: in page
# order, the file names ("File: NAME" lines, as FILE), the headings ("COVID: yes" or "COVID: no; most likely X", with
# any caution), the figures line under them ("COVID probability P% ...") and the captions of the "Analyse images" tab;
# else null.
RESULTS_READY_JS = """names => {
  if (document.querySelector("[data-testid='stStatusWidget']")) return null;
  const panel = document.querySelector("[data-testid='stTabPanel']");
  if (!panel) return null;
  const isName = e => e.tagName === "P" && e.firstElementChild?.tagName === "STRONG"
    && e.firstElementChild.textContent === "File:";
  const items = [...panel.querySelectorAll("h3, p, [data-testid='stCaptionContainer']")]
    .filter(e => e.tagName !== "P" || isName(e) || e.textContent.startsWith("COVID probability "))
    .map(e => isName(e) ? ["FILE", e.textContent.trim().replace(/^File:\\s*/, "")] : [e.tagName, e.textContent.trim()]);
  const headings = new Set(items.filter(([tag]) => tag === "FILE").map(([, text]) => text));
  const results = items.filter(([, text]) => text.startsWith("Probabilities: ")).length;
  const answers = items.filter(([tag, text]) => tag === "H3" && /^(COVID: |Most likely)/.test(text)).length;
  return names.every(n => headings.has(n)) && results === names.length && answers === names.length ? items : null;
}"""
# The empty page: the upload prompt, no results, no script running.
EMPTY_JS = """() => !document.querySelector("[data-testid='stStatusWidget']")
  && [...document.querySelectorAll("[data-testid='stAlert']")]
       .some(e => e.textContent.includes("Upload one or more chest X-rays"))
  && ![...document.querySelectorAll("[data-testid='stCaptionContainer']")]
       .some(e => e.textContent.startsWith("Probabilities: "))"""


@dataclass(frozen=True)
class Expected:
    """What the page must show for one image."""

    path: Path
    label: str
    probs: dict[str, float]
    sha256: str
    pixels: int

    @property
    def name(self) -> str:
        return self.path.name


def pick_images(data: Path, checkpoint: Path, count: int) -> list[Expected]:
    """``count`` real X-rays (distinct names) that the page assesses, whose predicted probabilities differ pairwise
    by ``MIN_PROB_GAP``."""
    from covidxr.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False).sample(frac=1.0, random_state=0)
    chosen: list[Expected] = []
    for rel in meta["path"]:
        path = data / rel
        if path.name in {c.name for c in chosen}:
            continue
        xray = load_xray(path)
        prediction = predictor.predict(xray, cam=None)
        if not assess(xray, prediction).assessable:
            continue
        if all(max(abs(prediction.probs[k] - c.probs[k]) for k in c.probs) >= MIN_PROB_GAP for c in chosen):
            chosen.append(Expected(path, prediction.label, prediction.probs, pixel_sha256(xray.pixels),
                                   xray.pixels.size))
        if len(chosen) == count:
            return chosen
    pytest.fail(f"only {len(chosen)} images with distinct predictions in {data}")


def parse_results(items: list[list[str]]) -> dict[str, dict[str, Any]]:
    """File name -> the class the headline names ("COVID: yes" names covid), the COVID percentage of the line under
    it and the per-class percentages shown in its box; a percentage is ``(bound, value)`` with bound "<" or ">" for
    the page's "< 1%" / "> 99%", else None."""
    shown: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for tag, text in items:
        headline = re.match(r"COVID: (yes|no; most likely (\S+?))(;|$)", text)
        below = re.match(rf"COVID probability {PERCENT} ", text)
        if tag == "H3" and headline and current is not None:
            current["label"] = "covid" if headline[1] == "yes" else headline[2]
        elif tag == "P" and below and current is not None:
            current["covid"] = (below[1], float(below[2]))
        elif tag == "FILE":
            assert text not in shown, f"{text} shown twice"
            current = shown[text] = {}
        elif text.startswith("Probabilities: ") and current is not None:
            pairs = (re.fullmatch(rf"(\S+) {PERCENT}", part) for part in
                     text.removeprefix("Probabilities: ").split(" · "))
            current["probs"] = {m[1]: (m[2], float(m[3])) for m in pairs if m}
    return shown


def shown_matches(shown: tuple[str | None, float], p: float, tolerance: float) -> bool:
    """Whether a percentage as the page shows it (see :func:`parse_results`) fits the probability ``p``."""
    bound, value = shown
    if bound == ">":
        return 100 * p > value
    if bound == "<":
        return 100 * p < value
    return abs(value - 100 * p) <= tolerance


def check_page(shown: dict[str, dict[str, Any]], files: list[Expected], where: str) -> None:
    """The page shows exactly ``files``, each with the class and probabilities the predictor gives."""
    assert set(shown) == {f.name for f in files}, f"{where}: page shows {sorted(shown)}"
    for f in files:
        box = shown[f.name]
        assert set(box.get("probs", {})) == set(f.probs), f"{where} {f.name}: {box}"
        for cls, p in f.probs.items():
            assert shown_matches(box["probs"][cls], p, PAGE_TOLERANCE), f"{where} {f.name} {cls}: {box} vs {f.probs}"
        top, second = sorted(f.probs.values())[-1], sorted(f.probs.values())[-2]
        if top - second > CSV_TOLERANCE:
            assert box["label"] == f.label, f"{where} {f.name}: {box} vs {f.label}"
        assert shown_matches(box["covid"], f.probs["covid"], 0.51), f"{where} {f.name}: {box}"


def check_csv(data: bytes, files: list[Expected], where: str) -> None:
    """The session's CSV download lists exactly ``files`` with the predictor's probabilities."""
    rows = {row["file"]: row for row in csv.DictReader(io.StringIO(data.decode("utf-8")))}
    assert set(rows) == {f.name for f in files}, f"{where}: CSV lists {sorted(rows)}"
    for f in files:
        for cls, p in f.probs.items():
            assert abs(float(rows[f.name][f"p_{cls}"]) - p) <= CSV_TOLERANCE, f"{where} {f.name}: {rows[f.name]}"


def server_rss(server: AppServer) -> int:
    """Resident set size of the server process and its children, in bytes."""
    import psutil

    process = psutil.Process(server.process.pid)
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def server_cpu_s(server: AppServer) -> float:
    """CPU time used by the server process so far (user + system), in seconds."""
    import psutil

    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


async def open_session(browser: Any, url: str) -> Any:
    """A new browser context (its own Streamlit session) with the page loaded and the model ready."""
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(RESULT_TIMEOUT_MS)
    await context.add_init_script(NO_ANIMATIONS_JS)
    page = await context.new_page()
    await page.goto(url)
    await expect(page.locator(UPLOAD_INPUT)).to_be_attached(timeout=RESULT_TIMEOUT_MS)
    return page


async def upload_and_read(page: Any, files: list[Expected], with_csv: bool) -> tuple[dict, bytes | None]:
    """Upload ``files`` and wait until their results are shown; return what the page shows (and its CSV)."""
    await page.locator(UPLOAD_INPUT).set_input_files([f.path for f in files])
    ready = await page.wait_for_function(RESULTS_READY_JS, arg=[f.name for f in files], polling=POLL_MS,
                                         timeout=RESULT_TIMEOUT_MS)
    shown = parse_results(await ready.json_value())
    csv_bytes = None
    if with_csv:
        async with page.expect_download(timeout=RESULT_TIMEOUT_MS) as info:
            await page.get_by_role("button", name=re.compile(r"^Download all results as CSV")).click()
        csv_bytes = Path(await (await info.value).path()).read_bytes()
    return shown, csv_bytes


async def remove_all(page: Any) -> int:
    """Click the Remove buttons of all uploaded files at once (one rerun, not one per file); wait for the empty page.

    Returns:
        How many files were removed.
    """
    removed = await page.evaluate(REMOVE_ALL_JS)
    await page.wait_for_function(EMPTY_JS, polling=POLL_MS, timeout=RESULT_TIMEOUT_MS)
    return removed


async def drive(server: AppServer, own: list[list[list[Expected]]]) -> dict[str, Any]:
    """Open the sessions, run the warm-up rounds, then the others; return RSS samples and times.

    Args:
        server: the running app.
        own: per session, its groups of files.
    """
    from playwright.async_api import async_playwright

    samples: dict[str, tuple[float, int, float]] = {}
    during: list[int] = []
    started = time.perf_counter()

    def sample(label: str) -> None:
        samples[label] = (time.perf_counter() - started, server_rss(server), server_cpu_s(server))

    async def watch() -> None:
        while True:
            during.append(server_rss(server))
            await asyncio.sleep(2)  # sampling interval for the peak, not synchronisation

    async def rounds(pages: list[Any], session: int, numbers: range) -> None:
        for round_ in numbers:
            files = own[session][round_ % GROUPS_PER_SESSION]
            where = f"round {round_} session {session}"
            shown, csv_bytes = await upload_and_read(pages[session], files, with_csv=round_ == 0)
            check_page(shown, files, where)
            if csv_bytes is not None:
                check_csv(csv_bytes, files, where)
            assert await remove_all(pages[session]) == len(files), where

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        watcher = asyncio.create_task(watch())
        try:
            pages = list(await asyncio.gather(*(open_session(browser, server.url) for _ in range(SESSIONS))))
            sample("pages loaded")
            await asyncio.gather(*(rounds(pages, s, range(WARMUP_ROUNDS)) for s in range(SESSIONS)))
            sample("after warm-up")
            await asyncio.gather(*(rounds(pages, s, range(WARMUP_ROUNDS, ROUNDS)) for s in range(SESSIONS)))
            sample("at the end")
        finally:
            watcher.cancel()
            await browser.close()
    return {"samples": samples, "peak": max(during, default=0)}


def test_upload_cap_is_the_readers_limit() -> None:
    """Streamlit's upload cap (MB) is covidxr.images.reader.MAX_FILE_BYTES, so no accepted upload is refused by the
    reader."""
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == MAX_FILE_BYTES


def test_results_are_read_from_plain_and_cautious_headlines() -> None:
    """A "COVID: yes" box names covid, a "COVID: no" box its most likely other class, with or without a caution; the
    COVID percentage comes from the line below the headline, so the load test checks both kinds of box."""
    items = [["FILE", "a.png"], ["H3", "COVID: yes"],
             ["P", "COVID probability 81% (yes when it is the most likely class). Other classes: normal 10%."],
             ["STCAPTIONCONTAINER", "Probabilities: covid 81.2% · normal 10.0% · pneumonia 8.8%"],
             ["FILE", "b.png"], ["H3", "COVID: no; most likely normal; caution: unusual film for this model"],
             ["P", "COVID probability 24% (yes when it is the most likely class). Other classes: normal 50%."],
             ["STCAPTIONCONTAINER", "Probabilities: covid 23.8% · normal 50.0% · pneumonia 26.2%"]]
    shown = parse_results(items)
    assert shown["a.png"]["label"] == "covid" and shown["a.png"]["covid"] == (None, 81.0)
    assert shown["b.png"]["label"] == "normal" and shown["b.png"]["covid"] == (None, 24.0)
    assert shown["b.png"]["probs"]["pneumonia"] == (None, 26.2)


@pytest.mark.browser
def test_concurrent_sessions_see_only_their_own_results_and_memory_stays_flat(
        tiny_run: Path, shared_data: Path, tmp_path: Path) -> None:
    require_chromium()
    pytest.importorskip("psutil")
    checkpoint = tiny_run / "best.pt"
    images = pick_images(shared_data, checkpoint, SESSIONS * GROUPS_PER_SESSION * FILES_PER_SESSION)
    groups = [images[i::SESSIONS * GROUPS_PER_SESSION] for i in range(SESSIONS * GROUPS_PER_SESSION)]
    own = [groups[s::SESSIONS] for s in range(SESSIONS)]
    with run_app(checkpoint, tmp_path, extra_env=MALLOC_ENV) as server:
        result = asyncio.run(drive(server, own))
        assert "Traceback" not in server.output(), server.output()[-3000:]

    uploads = SESSIONS * FILES_PER_SESSION * ROUNDS
    samples = result["samples"]
    growth = (samples["at the end"][1] - samples["after warm-up"][1]) / 2**20
    megapixels = sum(e.pixels for e in images) / len(images) / 1e6
    print(f"\n{SESSIONS} concurrent sessions, {uploads} uploads ({ROUNDS} rounds of {FILES_PER_SESSION} files in each "
          f"session) of {len(images)} real X-rays (mean {megapixels:.2f} megapixels)")
    for label, (seconds, rss, cpu) in samples.items():
        print(f"  {label:>14}: {seconds:5.0f} s, server RSS {rss / 2**20:6.0f} MB, server CPU {cpu:5.0f} s")
    print(f"  peak RSS sampled during the rounds: {result['peak'] / 2**20:.0f} MB")
    print(f"  RSS growth from the end of {WARMUP_ROUNDS} warm-up rounds "
          f"({SESSIONS * FILES_PER_SESSION * WARMUP_ROUNDS} uploads) to the end: {growth:+.1f} MB "
          f"(limit {RSS_GROWTH_LIMIT_MB} MB)")
    assert growth < RSS_GROWTH_LIMIT_MB

    records = read_records(server.audit)
    assert len(records) == uploads
    by_session: dict[str, Counter] = {}
    for record in records:
        by_session.setdefault(record["session_id"], Counter())[record["image_sha256"]] += 1
    times_each = ROUNDS // GROUPS_PER_SESSION
    expected = sorted(sorted((f.sha256, times_each) for group in session for f in group) for session in own)
    assert sorted(sorted(c.items()) for c in by_session.values()) == expected
    by_sha = {e.sha256: e for e in images}
    for record in records:
        probs = by_sha[record["image_sha256"]].probs
        assert all(abs(record["probabilities"][c] - p) <= CSV_TOLERANCE for c, p in probs.items()), record
