"""Benchmark: time from upload to headline in the browser, for a 2,000 px and a 5,000 px chest film.

Usage::

    python benchmarks/bench_latency.py [--checkpoint RUN/best.pt] [--sizes 2000 5000] [--repeats 3]
        [--data PATH] [--format png|jpeg] [--lung-model FILE] [--chromium /usr/bin/chromium]

Starts the real page (``streamlit run app/streamlit_app.py``) on a free local port, with ``--checkpoint`` or, without
one, an untrained EfficientNet-Lite0 at 224 px (the quickstart's architecture and input size; random weights time
the same). One real X-ray of the shared data is resized to each size (longest side, Lanczos) and saved once. The page
runs with an empty ``COVIDXR_HOME``, so without a lung model unless ``--lung-model`` names one: then the page also
masks the lungs and says how much of the heat map lies inside them, as an installation with a lung model does.
Chromium (Debian's, headless) opens a fresh session per upload, so nothing is cached in the session; the model itself
is loaded and warmed once by an untimed upload first. The clock starts when the file is handed to the uploader and
stops when the film's headline ("COVID: ..." or "Not assessed: ...") is visible: decoding, the input gate, the
prediction, the Grad-CAM heat map and the page's drawing are all inside it. Prints each upload's time, then the
median per size against the issue's goals (2,000 px <= 1.5 s, 5,000 px <= 3 s). Nothing is asserted: the numbers
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GOALS_S = {2000: 1.5, 5000: 3.0}
HEADLINE = re.compile("^(COVID: |Most likely|Not assessed: )")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: untrained efficientnet_lite0)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000], help="longest side of each film, px")
    parser.add_argument("--repeats", type=int, default=3, help="timed uploads per size")
    parser.add_argument("--data", type=Path, help="dataset folder (default: $COVIDXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="file format of the films")
    parser.add_argument("--lung-model", type=Path, help="lung model file for the page (default: none)")
    parser.add_argument("--chromium", default=os.environ.get("COVIDXR_CHROMIUM", "/usr/bin/chromium"))
    return parser.parse_args(argv)


def default_checkpoint(folder: Path) -> Path:
    """An untrained EfficientNet-Lite0 at 224 px as a checkpoint in ``folder``."""
    from covidxr.model.checkpoint import save_checkpoint
    from covidxr.networks.architectures import build_model, preprocess_for

    model = build_model("efficientnet_lite0", 3, "none")
    path = folder / "best.pt"
    save_checkpoint(path, {"arch": model.arch, "classes": ["covid", "normal", "pneumonia"],
                           "preprocess": preprocess_for(model, 224).to_dict(), "model": model.state_dict()})
    return path


def make_films(data: Path, sizes: list[int], fmt: str, folder: Path) -> dict[int, Path]:
    """One real frontal X-ray (the largest of the shared data) resized to each size, saved once."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    largest = meta.assign(side=pd.to_numeric(meta["width"]).clip(upper=pd.to_numeric(meta["height"])))
    source = Image.open(data / largest.sort_values("side")["path"].iloc[-1]).convert("L")
    films = {}
    for size in sizes:
        scale = size / max(source.size)
        film = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.LANCZOS)
        films[size] = folder / f"film-{size}px.{'png' if fmt == 'png' else 'jpg'}"
        film.save(films[size], **({"quality": 92} if fmt == "jpeg" else {}))
    return films


def start_app(checkpoint: Path, folder: Path, lung_model: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``streamlit run`` the page on a free local port (with ``lung_model`` as its installed lung model, if given);
    returns the process and its URL once it is healthy."""
    if lung_model is not None:
        (folder / "home" / "lungs").mkdir(parents=True)
        (folder / "home" / "lungs" / "lung-seg.pt").symlink_to(lung_model.resolve())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "COVIDXR_HOME": str(folder / "home")}
    command = [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--", "--checkpoint", str(checkpoint),
               "--audit-log", str(folder / "audit.jsonl")]
    log = (folder / "streamlit.log").open("wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return process, url
        except OSError:
            time.sleep(0.2)  # polling the health endpoint
    process.terminate()
    raise SystemExit(f"the page did not start; see {folder / 'streamlit.log'}")


def time_upload(browser: object, url: str, film: Path) -> float:
    """Seconds from handing ``film`` to the uploader of a fresh session until its headline is visible."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    try:
        page.goto(url)
        file_input = page.locator("[data-testid='stFileUploaderDropzoneInput']")
        expect(file_input).to_be_attached(timeout=180_000)
        started = time.perf_counter()
        file_input.set_input_files([film])
        expect(page.get_by_role("heading", name=HEADLINE).first).to_be_visible(timeout=180_000)
        return time.perf_counter() - started
    finally:
        page.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    from playwright.sync_api import sync_playwright

    args = parse_args(argv)
    data = args.data or Path(os.environ.get("COVIDXR_DATA") or REPO.parent / "shared" / "data" / "cxr")
    with tempfile.TemporaryDirectory(prefix="covidxr-latency-") as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or default_checkpoint(folder)
        films = make_films(data, args.sizes, args.format, folder)
        process, url = start_app(checkpoint, folder, args.lung_model)
        times: dict[int, list[float]] = {size: [] for size in args.sizes}
        print(f"load averages at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                     args=["--no-sandbox", "--disable-gpu"])
                time_upload(browser, url, films[min(args.sizes)])  # loads and warms the model: not timed
                for _ in range(args.repeats):
                    for size in args.sizes:
                        times[size].append(time_upload(browser, url, films[size]))
                        print(f"{size} px: {times[size][-1]:.2f} s", flush=True)
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
        print(f"\nupload to headline, {args.repeats} fresh sessions per size ({checkpoint.name}, "
              f"{os.cpu_count()} CPUs, {args.format}, lung model {'yes' if args.lung_model else 'no'}, load "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}):")
        print(f"{'film':>9} {'file MB':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'goal s':>7}  met")
        for size in args.sizes:
            goal = GOALS_S.get(size)
            median = statistics.median(times[size])
            met = "" if goal is None else ("yes" if median <= goal else "no")
            print(f"{size:>6} px {films[size].stat().st_size / 2**20:>8.1f} {median:>9.2f} {min(times[size]):>7.2f} "
                  f"{max(times[size]):>7.2f} {goal or float('nan'):>7.1f}  {met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
