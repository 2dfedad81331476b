"""``python -m covidxr.predict``: predict chest X-rays with a trained checkpoint and write Grad-CAM overlays.

Command line::

    python -m covidxr.predict --checkpoint RUN/best.pt IMAGE_OR_FOLDER... [--cam METHOD|none] [--cam-class CLASS]
        [--out FOLDER] [--device auto|cpu|cuda|mps] [--batch-size N] [--backend auto|torch|onnx]

prints ``FILE: CLASS PROBABILITY`` per image, or ``FILE: not assessed: REASON`` when the input gate refuses it (not an
assessable frontal chest radiograph, see :mod:`covidxr.inference.gate`), writes ``FOLDER/predictions.csv`` (path,
predicted (empty for a refused image), gate (``assessed`` / ``not assessed``), gate_reason, one ``prob_CLASS`` column
per class (the model's output, also for refused images), cam_class, overlay, note, error) and, unless ``--cam none``,
one overlay PNG per assessed image in FOLDER.
Folders are searched recursively for image files (:data:`SEARCHED_SUFFIXES`, and files without a suffix, which is
how DICOM files often come); hidden files are skipped. Files named on the command line are always tried.
Unreadable files get their own error line on stderr and a row with their error in the CSV; the other files are
still predicted. Exit status: 0 when every file was predicted, 1 when some could not be read, 2 for usage errors
(bad option, unusable checkpoint, nothing to predict), with one line on stderr and no traceback, 130 when
interrupted (``covidxr.utils.run_cli``).

The predictor itself is :class:`covidxr.inference.predictor.Predictor`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from covidxr.errors import CovidxrError, ImageReadError
from covidxr.explain.cam import CAM_METHODS, resolve_layer
from covidxr.explain.display import overlay
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.inference.predictor import BACKENDS, Predictor
from covidxr.io import Xray, load_xray
from covidxr.utils import (
    EXIT_DONE,
    EXIT_SOME_FAILED,
    OneLineParser,
    add_checkpoint_arg,
    add_device_arg,
    add_out_arg,
    run_cli,
    setup_logging,
)

log = logging.getLogger("covidxr.predict")

SEARCHED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2",
                               ".j2k", ".jpf", ".jpx", ".dcm", ".dicom", ".dic"})
"""Suffixes searched for in folders (files named explicitly are always tried; load_xray detects the format)."""


@dataclass(frozen=True)
class PredictOptions:
    """What to explain and draw for every file.

    Attributes:
        cam: CAM method, or None for no explanation (and no overlay).
        cam_class: class to explain (name or index), or None for the predicted class.
        cam_layer: dotted name of the layer to explain, or None for the architecture's default.
        batch_size: images per forward pass.
        alpha: overlay opacity of the heatmap, in ``[0, 1]``.
        max_side: longest side of the overlays, in pixels.
    """

    cam: str | None = "gradcam"
    cam_class: str | None = None
    cam_layer: str | None = None
    batch_size: int = 8
    alpha: float = 0.4
    max_side: int = 1024


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.predict``."""
    parser = OneLineParser(prog="python -m covidxr.predict",
                           description="Predict chest X-rays (PNG, JPEG, DICOM, ... or folders of them) with a trained "
                                       "checkpoint and explain each prediction with a Grad-CAM overlay.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders (recursive)")
    add_checkpoint_arg(parser, "the run's checkpoint (best.pt)")
    parser.add_argument("--cam", default="gradcam", choices=(*CAM_METHODS, "none"), metavar="METHOD",
                        help=f"explanation method: {', '.join(CAM_METHODS)}, or none (default: %(default)s)")
    parser.add_argument("--cam-class", help="class to explain, by name or index (default: the predicted class)")
    parser.add_argument("--cam-layer", help="dotted name of the layer to explain (default: per architecture)")
    add_out_arg(parser, "folder for predictions.csv and the overlays (default: %(default)s)", Path("predictions"))
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="plain predictions with torch, ONNX Runtime, or auto (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.4, help="overlay opacity of the heatmap (default: 0.4)")
    parser.add_argument("--max-side", type=int, default=1024, help="longest side of the overlays (default: 1024)")
    return parser


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand the command line's files and folders into the files to predict, in order, without duplicates.

    Args:
        inputs: files (kept whatever their name, even when missing: the reader reports it) and folders
            (searched recursively for :data:`SEARCHED_SUFFIXES` and files without a suffix; hidden ones skipped).

    Returns:
        The files.
    """
    found: dict[Path, None] = {}
    for item in map(Path, inputs):
        if not item.is_dir():
            found.setdefault(item, None)
            continue
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                file = Path(dirpath) / name
                if not name.startswith(".") and (file.suffix.lower() in SEARCHED_SUFFIXES or not file.suffix):
                    found.setdefault(file, None)
    return list(found)


def _png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(h, w, 3)`` uint8 RGB array as a PNG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay_name(path: Path, method: str, used: set[str]) -> str:
    """A unique overlay file name for ``path``: ``STEM_METHOD.png``, then ``STEM_METHOD-2.png``, ... (``used``, the
    names taken so far, is updated)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "image"
    method_tag = method.replace("+", "p")
    name, n = f"{stem}_{method_tag}.png", 2
    while name in used:
        name, n = f"{stem}_{method_tag}-{n}.png", n + 1
    used.add(name)
    return name


def run_predictions(predictor: Predictor, files: Sequence[Path], out: Path,
                    options: PredictOptions) -> tuple[list[dict], int]:
    """Predict ``files`` in batches, print one line per file and write the overlays into ``out``.

    Returns:
        ``(CSV rows, number of failed files)``.
    """
    rows: list[dict] = []
    used: set[str] = set()
    failed = 0
    for start in range(0, len(files), options.batch_size):
        batch: list[tuple[Path, Xray]] = []
        for file in files[start : start + options.batch_size]:
            try:
                batch.append((file, load_xray(file, name=str(file))))
            except ImageReadError as exc:
                failed += 1
                reason = str(exc).removeprefix(f"{file}: ")
                print(f"{file}: error: {reason}", file=sys.stderr)
                rows.append({"path": str(file), "error": reason})
        if not batch:
            continue
        results = predictor.predict_batch([x for _, x in batch], cam=options.cam, names=[str(f) for f, _ in batch],
                                          cam_class=options.cam_class, cam_layer=options.cam_layer)
        for (file, xray), result in zip(batch, results, strict=True):
            gate = result.gate
            row = {"path": str(file), "predicted": result.label if result.assessable else "", "gate": gate.status,
                   "gate_reason": gate.reason, "cam_class": result.cam_class or "", "note": result.note or "",
                   "overlay": "", "error": ""}
            row |= {f"prob_{c}": f"{p:.6f}" for c, p in result.probs.items()}
            rows.append(row)
            if not result.assessable:
                print(f"{file}: {gate.headline()}")
                continue
            if options.cam is not None:
                name = _overlay_name(file, options.cam, used)
                picture = overlay(xray.pixels, result.heatmap, options.alpha, options.max_side)
                atomic_write_bytes(out / name, _png_bytes(picture))
                row["overlay"] = name
            print(f"{file}: {result.label} {result.confidence:.3f}" + (f" ({result.note})" if result.note else ""))
    return rows, failed


def write_csv(path: Path, rows: list[dict], classes: list[str]) -> None:
    """Write ``predictions.csv`` atomically: one row per file, one probability column per class."""
    fields = ["path", "predicted", "gate", "gate_reason", *[f"prob_{c}" for c in classes], "cam_class", "overlay",
              "note", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``): 0 when every file was
    predicted, 1 when some files could not be read, 2 for bad arguments or an unusable checkpoint."""
    parser = get_args_parser()
    return run_cli(parser, lambda args: predict(parser, args), argv, (CovidxrError, ValueError, OSError))


def predict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Predict every file of ``args.inputs``; return ``EXIT_SOME_FAILED`` when some could not be read."""
    if args.batch_size < 1 or args.max_side < 1 or not 0 <= args.alpha <= 1:
        parser.error("--batch-size and --max-side must be positive and --alpha in [0, 1]")
    setup_logging()
    options = PredictOptions(cam=None if args.cam == "none" else args.cam, cam_class=args.cam_class,
                             cam_layer=args.cam_layer, batch_size=args.batch_size, alpha=args.alpha,
                             max_side=args.max_side)
    files = find_images(args.inputs)
    if not files:
        parser.error(f"no image files found in {', '.join(args.inputs)}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    if (options.cam_class is not None or options.cam_layer is not None) and options.cam is None:
        raise ValueError("--cam-class and --cam-layer need a --cam method")
    if options.cam_class is not None:
        predictor.class_index(options.cam_class)
    if options.cam_layer is not None:
        resolve_layer(predictor.model, options.cam_layer)
    args.out.mkdir(parents=True, exist_ok=True)
    if not predictor.gate.learned:
        log.warning("input gate: %s", predictor.gate.unavailable)
    rows, failed = run_predictions(predictor, files, args.out, options)
    write_csv(args.out / "predictions.csv", rows, predictor.classes)
    summary = {"predicted": len(files) - failed, "failed": failed, "csv": str(args.out / "predictions.csv"),
               "backend": predictor.backend}
    log.info("done: %s", json.dumps(summary))
    return EXIT_SOME_FAILED if failed else EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
