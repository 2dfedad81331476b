"""``python -m covidxr.explain``: Grad-CAM explanation tools (``score``: rate CAM methods on a dataset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidxr.errors import CovidxrError
from covidxr.explain.scoring import ROAD_PERCENTILES, markdown_table, score
from covidxr.model.cam import CAM_METHODS
from covidxr.utils import OneLineParser, add_checkpoint_arg, add_device_arg, add_out_arg, run_cli, setup_logging


def get_args_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m covidxr.explain``."""
    parser = OneLineParser(prog="python -m covidxr.explain", description="Grad-CAM explanation tools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sc = commands.add_parser("score", help="rate CAM methods with faithfulness metrics on a dataset",
                             description="Explain images with each method and score the heatmaps with "
                                         "pytorch-grad-cam's CamMultImageConfidenceChange and ROAD metrics, plus "
                                         "the share of heatmap mass in the image border band.")
    add_checkpoint_arg(sc, "the run's checkpoint (best.pt)")
    sc.add_argument("--data", help="dataset folder or manifest (default: the run's training data)")
    sc.add_argument("--split", choices=("test", "val", "all"), default="test",
                    help="images of the run's split (needs the run's training data), or all images of --data")
    sc.add_argument("--methods", nargs="+", choices=CAM_METHODS, default=["gradcam", "gradcam++", "eigencam"],
                    metavar="METHOD", help=f"CAM methods ({', '.join(CAM_METHODS)}); default: %(default)s")
    sc.add_argument("--limit", type=int, help="at most N images, spread over the classes")
    add_out_arg(sc, "output folder (default: %(default)s)", Path("explain"))
    sc.add_argument("--road-percentiles", type=int, nargs="+", default=list(ROAD_PERCENTILES), metavar="P",
                    help="percentiles of pixels ROAD removes (default: %(default)s)")
    sc.add_argument("--batch-size", type=int, default=8, help="images per CAM call (default: %(default)s)")
    add_device_arg(sc)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    parser = get_args_parser()

    def run(args: argparse.Namespace) -> None:
        if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
            parser.error("--limit and --batch-size must be positive")
        if any(not 0 < p < 100 for p in args.road_percentiles):
            parser.error("--road-percentiles must lie strictly between 0 and 100")
        setup_logging()
        summary = score(args.checkpoint, args.data, args.split, list(dict.fromkeys(args.methods)), args.limit,
                        args.out, args.device, args.batch_size, args.road_percentiles)
        print(markdown_table(summary))
        print(f"reports in {args.out}: explain_scores.csv, explain_summary.csv, explain_summary.md, "
              "explain_summary.html")

    return run_cli(parser, run, argv, (CovidxrError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
