"""Profile: where the seconds go between an upload and its headline, outside the browser.

Usage::

    python benchmarks/profile_upload.py --checkpoint RUN/best.pt [--sizes 2000 5000] [--formats png jpeg]
        [--data PATH] [--lung-model FILE] [--top 15] [--repeats 2]

Makes the same films as ``benchmarks/bench_latency.py`` (one real X-ray of the shared data resized to each size) and
runs, for each, the steps the page runs for one upload in the order it runs them, through the page's own helpers,
timing each: reading the file (``covidxr.images.reader.load_xray``), the pixels' SHA-256 for the audit log, the
prediction with its Grad-CAM heat map and input gate (``Predictor.predict``), the lung mask and the heat map's share
inside the lungs
(``app.heatmap.heatmap_share``, with ``--lung-model`` as the installed lung model), the decision, and the two pictures
as the page draws and encodes them (``overlay`` of the display-size arrays and Streamlit's JPEG encoding).
The model is warmed by one untimed film first. Prints the fastest time of each step per film (the
fastest of ``--repeats`` runs: the least disturbed by other work on the machine), then the top functions
of a cProfile run of the whole path for the largest film. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to profile")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000], help="longest side of each film, px")
    parser.add_argument("--formats", nargs="+", choices=("png", "jpeg"), default=["png", "jpeg"])
    parser.add_argument("--data", type=Path, help="dataset folder (default: $COVIDXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--lung-model", type=Path, help="lung model file: include the lung share as the page does")
    parser.add_argument("--top", type=int, default=15, help="cProfile rows to print")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per film")
    return parser.parse_args(argv)


def upload_steps(data: bytes, name: str, predictor: Any, lungs: Any) -> list[tuple[str, Callable[[], Any]]]:
    """The page's work for one upload as named steps, through the page's own helpers (each step reads what the ones
    before it left in ``state``); ``lungs`` is the lung model the page finds installed, or None."""
    from streamlit.elements.lib.image_utils import image_to_url
    from streamlit.elements.lib.layout_utils import LayoutConfig

    import covidxr.lungs
    from app.analysis import Context, Upload
    from app.assessment import assess
    from app.heatmap import DISPLAY_MAX_SIDE, display_heatmap, display_image, heatmap_share
    from covidxr.errors import CheckpointError
    from covidxr.explain.display import overlay
    from covidxr.images.reader import load_xray
    from covidxr.inference.decision import decide_prediction
    from covidxr.inference.prediction_log import pixel_sha256

    def installed(path: object = None) -> Any:
        if lungs is None:
            raise CheckpointError("no lung model")
        return lungs

    covidxr.lungs.load_lung_model = installed  # what the page finds in its home folder
    upload = Upload(name, data, "profile")
    ctx = Context(predictor, "profile", None, "profile", {})
    state: dict[str, Any] = {}

    def encode(rgb: Any) -> None:
        image_to_url(rgb, LayoutConfig(width="stretch"), clamp=False, channels="RGB", output_format="JPEG",
                     image_id="profile")

    return [
        ("read", lambda: state.__setitem__("xray", load_xray(data, name=name))),
        ("sha256", lambda: pixel_sha256(state["xray"].pixels)),
        ("predict+cam+gate", lambda: state.__setitem__("prediction", predictor.predict(state["xray"], cam="gradcam"))),
        ("assess", lambda: assess(state["xray"], state["prediction"])),
        ("lung share", lambda: state.__setitem__("share", heatmap_share(upload, state["xray"], state["prediction"],
                                                                        ctx))),
        ("decision", lambda: decide_prediction(state["prediction"], predictor.operating_point, state["share"])),
        ("image picture", lambda: encode(overlay(display_image(upload, state["xray"], ctx), None,
                                                 max_side=DISPLAY_MAX_SIDE))),
        ("heat-map picture", lambda: encode(overlay(display_image(upload, state["xray"], ctx),
                                                    display_heatmap(upload, state["prediction"], ctx), alpha=0.6,
                                                    max_side=DISPLAY_MAX_SIDE))),
    ]


def run_once(data: bytes, name: str, predictor: Any, lungs: Any) -> dict[str, float]:
    """Seconds per step for one upload."""
    times = {}
    for step, work in upload_steps(data, name, predictor, lungs):
        started = time.perf_counter()
        work()
        times[step] = time.perf_counter() - started
    return times


def main(argv: list[str] | None = None) -> int:
    """Profile and print."""
    spec = importlib.util.spec_from_file_location("bench_latency", REPO / "benchmarks" / "bench_latency.py")
    bench_latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_latency)  # the same films as the browser benchmark
    make_films = bench_latency.make_films
    from covidxr.inference.predictor import Predictor
    from covidxr.lungs import load_lung_model

    args = parse_args(argv)
    data = args.data or Path(os.environ.get("COVIDXR_DATA") or REPO.parent / "shared" / "data" / "cxr")
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    lungs = load_lung_model(args.lung_model) if args.lung_model else None
    with tempfile.TemporaryDirectory(prefix="covidxr-profile-") as tmp:
        films = {fmt: make_films(data, args.sizes, fmt, Path(tmp) / fmt) for fmt in args.formats
                 if (Path(tmp) / fmt).mkdir() is None}
        first = films[args.formats[0]][min(args.sizes)]
        run_once(first.read_bytes(), first.name, predictor, lungs)  # warm-up: not timed
        print(f"checkpoint {args.checkpoint}, backend {predictor.backend}, lung model "
              f"{'yes' if lungs else 'no'}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        for fmt, by_size in films.items():
            for size, path in by_size.items():
                raw = path.read_bytes()
                runs = [run_once(raw, path.name, predictor, lungs) for _ in range(args.repeats)]
                steps = {step: min(r[step] for r in runs) for step in runs[0]}
                total = min(sum(r.values()) for r in runs)
                print(f"\n{fmt} {size} px ({len(raw) / 2**20:.1f} MB): fastest run {total:.2f} s, fastest steps:")
                for step, seconds in steps.items():
                    print(f"  {step:<18} {seconds:6.3f} s")
        largest = films[args.formats[0]][max(args.sizes)]
        profile = cProfile.Profile()
        profile.runcall(run_once, largest.read_bytes(), largest.name, predictor, lungs)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"\ncProfile of {args.formats[0]} {max(args.sizes)} px, by own time:")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
