"""``python -m covidxr.export``: export a checkpoint's model to ONNX for ONNX Runtime.

Usage::

    python -m covidxr.export --checkpoint RUN/best.pt --format onnx [--out FOLDER] [--exporter dynamo|legacy]
        [--site PROFILE]

The file (``best.onnx`` for ``best.pt``, in ``--out`` or by default beside the checkpoint) is written atomically.
Its input is ``image``, ``(B, 1, S, S)`` float32 in ``[0, 1]`` with a dynamic batch size, its output ``logits``
``(B, C)`` without softmax (apply the checkpoint's temperature and a softmax for probabilities); normalisation is
inside the graph. The checkpoint's SHA-256 is recorded in the ONNX ``metadata_props`` (``covidxr.checkpoint_sha256``),
with the architecture, classes and input size, so :class:`covidxr.inference.predictor.Predictor` never uses a stale
export.
With ``--site PROFILE`` (``python -m covidxr.adapt``) the exported weights carry the site's batch-norm statistics and
prior shift, the file is ``best.site-NAME.onnx`` and its metadata names the profile (``covidxr.site``), with its
temperature: the logits then need the profile's temperature, not the checkpoint's.
Exit status (``covidxr.utils.run_cli``): 0 on success, 2 on errors (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from covidxr.errors import CovidxrError
from covidxr.inference.onnx_backend import EXPORTERS, default_onnx_path, export_bytes, export_metadata, write_onnx
from covidxr.model.trained import TrainedModel
from covidxr.utils import OneLineParser, add_checkpoint_arg, add_out_arg, out_file, run_cli


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                      exporter: str = "dynamo", site: str | os.PathLike | None = None) -> Path:
    """Export the model of a covidxr checkpoint to ONNX.

    Args:
        checkpoint: the checkpoint file.
        out: the ONNX file to write (default: :func:`covidxr.inference.onnx_backend.default_onnx_path`, or
            :func:`site_onnx_path` with a site).
        exporter: ``"dynamo"`` or ``"legacy"`` (see :func:`covidxr.inference.onnx_backend.export_bytes`).
        site: a site profile of this checkpoint whose adaptation goes into the exported weights.

    Returns:
        The path written.

    Raises:
        CheckpointError: unusable checkpoint.
        SiteProfileError: a profile of another checkpoint.
        CovidxrError: missing onnx packages or a failed export.
    """
    checkpoint = Path(checkpoint)
    trained = TrainedModel.load(checkpoint, device="cpu", site=site)
    model, img_size, profile = trained.network, trained.img_size, trained.site
    summary = {**profile.summary(), "temperature": trained.calibration.temperature} if trained.adapted else None
    data = export_bytes(model, img_size, export_metadata(trained.sha256, model.arch, list(trained.classes), img_size,
                                                         summary), exporter)
    default = default_onnx_path(checkpoint) if summary is None else site_onnx_path(checkpoint, profile.name)
    return write_onnx(Path(out) if out is not None else default, data)


def site_onnx_path(checkpoint: str | os.PathLike, site: str) -> Path:
    """``best.site-NAME.onnx`` beside ``best.pt``: the export of a site's adapted model, apart from the plain one."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.site-{site.replace(' ', '_')}.onnx")


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.export``."""
    parser = OneLineParser(prog="python -m covidxr.export", description="Export a checkpoint's model for ONNX Runtime.")
    add_checkpoint_arg(parser, "the run's checkpoint (best.pt)")
    parser.add_argument("--format", required=True, choices=("onnx",), help="export format")
    add_out_arg(parser, "folder for the .onnx file (default: the checkpoint's folder)")
    parser.add_argument("--site", type=Path, metavar="PROFILE",
                        help="site profile (python -m covidxr.adapt) to export adapted (default: the plain model)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                        help="torch.onnx exporter (default: %(default)s; legacy is faster but deprecated)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    parser = get_args_parser()

    def export(args: argparse.Namespace) -> None:
        out = out_file(args.out, default_onnx_path(args.checkpoint).name, parser.prog) if args.out else None
        written = export_checkpoint(args.checkpoint, out, args.exporter, args.site)
        print(f"exported {args.checkpoint} to {written}" + (f" (site profile {args.site})" if args.site else ""))

    return run_cli(parser, export, argv, (CovidxrError, OSError))


if __name__ == "__main__":
    sys.exit(main())
