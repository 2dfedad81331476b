"""``python -m covidxr.predict``: predict chest X-rays with a trained checkpoint and write Grad-CAM overlays.

Command line::

    python -m covidxr.predict --checkpoint RUN/best.pt IMAGE_OR_FOLDER... [--cam METHOD|none] [--cam-class CLASS]
        [--out FOLDER] [--device auto|cpu|cuda|mps] [--batch-size N] [--backend auto|torch|onnx]
        [--dicom-out [--dicom-study-from FILE.dcm]] [--site PROFILE]

prints ``FILE: DECISION (COVID probability P (yes from T))`` per image, or ``FILE: not assessed: REASON`` when the
input gate refuses it (not an assessable frontal chest radiograph, see :mod:`covidxr.model.gate`), writes
``FOLDER/predictions.csv`` (path, predicted (empty for a refused image), decision (the words the app shows: "COVID:
no; most likely pneumonia", see :mod:`covidxr.inference.decision`), gate (``assessed`` / ``borderline`` / ``not
assessed``), gate_reason, one ``prob_CLASS`` column per class (the model's output, also for refused images),
cam_class, overlay, note, error) and, unless ``--cam none``, one overlay PNG per assessed image in FOLDER. A
borderline film ("unusual film: read with care") is predicted and printed with that note. With ``--dicom-out`` it also
writes, per file, ``STEM_sr.dcm`` (a DICOM Structured Report) and, for an assessed image, ``STEM_sc.dcm`` (a Secondary
Capture of the captioned overlay), in the input's study (see :mod:`covidxr.inference.dicom_out`); an input that is not
DICOM needs ``--dicom-study-from`` to name a DICOM file of its study, else the command stops with a one-line error.
These two files carry the patient's identity, copied from the source (every other output holds none).
``--site PROFILE`` runs the model adapted to a hospital (a site profile of ``python -m covidxr.adapt``, pinned to this
checkpoint; a profile of another checkpoint is refused in one line); the first line printed, the log and the DICOM
outputs name it. Folders are
searched recursively for image files (:data:`SEARCHED_SUFFIXES`, and files without a suffix, which is how DICOM files
often come); hidden files are skipped. Files named on the command line are always tried. Unreadable files get their
own error line on stderr and a row with their error in the CSV; the other files are still predicted. Exit status: 0
when every file was predicted, 1 when some could not be read, 2 for usage errors (bad option, unusable checkpoint,
nothing to predict), with one line on stderr and no traceback, 130 when interrupted (``covidxr.utils.run_cli``).

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
from pydicom.dataset import Dataset

from covidxr.errors import CovidxrError, ImageReadError
from covidxr.explain.display import captioned, overlay
from covidxr.files import atomic_write_bytes, atomic_write_text
from covidxr.images.dicom import is_dicom
from covidxr.images.reader import Xray, load_xray
from covidxr.inference.decision import Decision, decide_prediction
from covidxr.inference.dicom_out import caption_lines, dicom_bytes, read_header, results_as_dicom
from covidxr.inference.predictor import BACKENDS, Prediction, Predictor
from covidxr.model.cam import CAM_METHODS, resolve_layers
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
        dicom_out: write a DICOM SR (and, for an assessed image, a Secondary Capture) per file.
        dicom_study: for non-DICOM inputs, the header of a DICOM file of their study (``--dicom-study-from``).
    """

    cam: str | None = "gradcam"
    cam_class: str | None = None
    cam_layer: str | None = None
    batch_size: int = 8
    alpha: float = 0.4
    max_side: int = 1024
    dicom_out: bool = False
    dicom_study: Dataset | None = None


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
    parser.add_argument("--site", type=Path, metavar="PROFILE",
                        help="site profile of this checkpoint (python -m covidxr.adapt) to run the model adapted to "
                             "that hospital (default: unadapted)")
    parser.add_argument("--alpha", type=float, default=0.4, help="overlay opacity of the heatmap (default: 0.4)")
    parser.add_argument("--max-side", type=int, default=1024, help="longest side of the overlays (default: 1024)")
    parser.add_argument("--dicom-out", action="store_true",
                        help="also write a DICOM Structured Report and a Secondary Capture of the overlay per file, in "
                             "the input's study")
    parser.add_argument("--dicom-study-from", type=Path, metavar="FILE.dcm",
                        help="with --dicom-out: a DICOM file whose patient and study the results of non-DICOM inputs "
                             "are filed under")
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


def _output_name(path: Path, tag: str, used: set[str], suffix: str = ".png") -> str:
    """A unique output file name for ``path``: ``STEM_TAG.png``, then ``STEM_TAG-2.png``, ... (``used``, the names
    taken so far, is updated)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "image"
    tag = tag.replace("+", "p")
    name, n = f"{stem}_{tag}{suffix}", 2
    while name in used:
        name, n = f"{stem}_{tag}-{n}{suffix}", n + 1
    used.add(name)
    return name


def _write_dicom(file: Path, xray: Xray, result: Prediction, picture: np.ndarray | None, predictor: Predictor,
                 out: Path, options: PredictOptions, used: set[str], decision: Decision | None) -> None:
    """Write the SR and, for an assessed image, the Secondary Capture of its captioned overlay (``picture``, or the
    plain image without a CAM), filed in the input's study or the ``--dicom-study-from`` one."""
    is_source = xray.format == "DICOM"
    study = read_header(file, str(file)) if is_source else options.dicom_study
    if study is None:  # main() checks this before predicting; a file can still change in between
        raise CovidxrError(f"{file}: not a DICOM file; --dicom-study-from must name a DICOM file of its study")
    labelled = None
    if result.assessable:
        lines = caption_lines(result, predictor, decision)
        if picture is None:
            labelled = captioned(overlay(xray.pixels, None, max_side=options.max_side), lines, colormap=None)
        else:
            labelled = captioned(picture, lines)
    capture, report = results_as_dicom(result, predictor, study, is_source=is_source, labelled=labelled,
                                       decision=decision)
    if capture is not None:
        atomic_write_bytes(out / _output_name(file, "sc", used, ".dcm"), dicom_bytes(capture))
    atomic_write_bytes(out / _output_name(file, "sr", used, ".dcm"), dicom_bytes(report))


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
            decision = decide_prediction(result, predictor.operating_point) if result.assessable else None
            row["decision"] = decision.text if decision else ""
            row |= {f"prob_{c}": f"{p:.6f}" for c, p in result.probs.items()}
            rows.append(row)
            picture = None
            if not result.assessable:
                print(f"{file}: {gate.headline()}")
            else:
                if options.cam is not None:
                    name = _output_name(file, options.cam, used)
                    picture = overlay(xray.pixels, result.heatmap, options.alpha, options.max_side)
                    atomic_write_bytes(out / name, _png_bytes(picture))
                    row["overlay"] = name
                notes = [n for n in (gate.headline() if gate.borderline else "", result.note) if n]
                words = f"{decision.text} ({decision.figures})" if decision else result.label
                print(f"{file}: {words}" + (f" ({'; '.join(notes)})" if notes else ""))
            if options.dicom_out:
                try:
                    _write_dicom(file, xray, result, picture, predictor, out, options, used, decision)
                except CovidxrError as exc:
                    failed += 1
                    reason = str(exc).removeprefix(f"{file}: ")
                    print(f"{file}: error: {reason}", file=sys.stderr)
                    row["error"] = reason
    return rows, failed


def _dicom_study(study_file: Path | None, files: Sequence[Path]) -> Dataset | None:
    """The header of ``--dicom-study-from`` (None when not given).

    Raises:
        CovidxrError: when it is unreadable, or when it is missing and some input is not DICOM (results are never
            filed under an invented patient or study).
    """
    if study_file is not None:
        return read_header(study_file, str(study_file))
    for file in files:
        try:
            with open(file, "rb") as handle:
                head = handle.read(132)
        except OSError:
            continue  # reported as that file's read error
        if head and not is_dicom(head):
            raise CovidxrError(f"{file} is not a DICOM file: --dicom-out needs --dicom-study-from FILE.dcm to name a "
                               "DICOM file of its study (patient and study are never invented)")
    return None


def write_csv(path: Path, rows: list[dict], classes: list[str]) -> None:
    """Write ``predictions.csv`` atomically: one row per file, one probability column per class."""
    fields = ["path", "predicted", "decision", "gate", "gate_reason", *[f"prob_{c}" for c in classes], "cam_class",
              "overlay", "note", "error"]
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
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines list every module it copies
    if args.dicom_study_from is not None and not args.dicom_out:
        parser.error("--dicom-study-from needs --dicom-out")
    files = find_images(args.inputs)
    if not files:
        parser.error(f"no image files found in {', '.join(args.inputs)}")
    study = _dicom_study(args.dicom_study_from, files) if args.dicom_out else None
    options = PredictOptions(cam=None if args.cam == "none" else args.cam, cam_class=args.cam_class,
                             cam_layer=args.cam_layer, batch_size=args.batch_size, alpha=args.alpha,
                             max_side=args.max_side, dicom_out=args.dicom_out, dicom_study=study)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend, site=args.site)
    if predictor.site is not None:
        print(f"site: {predictor.site.describe()}")
    if (options.cam_class is not None or options.cam_layer is not None) and options.cam is None:
        raise ValueError("--cam-class and --cam-layer need a --cam method")
    if options.cam_class is not None:
        predictor.class_index(options.cam_class)
    if options.cam_layer is not None:
        resolve_layers(predictor.model, options.cam_layer)
    args.out.mkdir(parents=True, exist_ok=True)
    if not predictor.gate.learned:
        log.warning("input gate: %s", predictor.gate.unavailable)
    rows, failed = run_predictions(predictor, files, args.out, options)
    write_csv(args.out / "predictions.csv", rows, predictor.classes)
    summary = {"predicted": len(files) - failed, "failed": failed, "csv": str(args.out / "predictions.csv"),
               "backend": predictor.backend, "site": None if predictor.site is None else predictor.site.summary()}
    log.info("done: %s", json.dumps(summary))
    return EXIT_SOME_FAILED if failed else EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
