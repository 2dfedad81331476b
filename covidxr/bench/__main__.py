"""``python -m covidxr.bench``: how fast this machine trains, loads and predicts, the plain way and the project's way.

Every measurement runs the plain way and the project's way in the same invocation, each in a fresh Python
process (so that peak memory is its own), and prints one Markdown table:

* training img/s on synthetic tensors (on CUDA: fp32 NCHW vs AMP + channels_last, with model FLOP utilisation),
  and the same steps fed by the real loaders (``--gpu-cache``, loader processes with and without the cache)
  against synthetic tensors;
* loader img/s over real images: a notebook-style loader that decodes with PIL every epoch (``ImageFolder``'s
  loader, ``Resize`` + ``ToTensor``) vs the decode-once cache, and the on-device batch pipeline (``--gpu-cache``);
* a head-only epoch: augmented images through the frozen backbone vs the feature cache (``--linear-probe``);
* inference img/s at batch 1 and 32: torch eager fp32 vs the project's path (ONNX Runtime when
  ``covidxr.inference.onnx_backend`` can export, else channels_last + ``inference_mode``; the table says which).

Timings on a shared machine are noisy: short ones (loader epochs, inference) report the median and range of
``--repeats`` runs and each ratio its range over the paired runs; long ones (training steps, the frozen-backbone
epoch) run once, and the header records the load average before and after.

``python -m covidxr.bench scale --images N [N ...]`` is another benchmark: every data stage at dataset size N, timed,
with peak memory and disk (:mod:`covidxr.bench.scale`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import asdict

import torch

from covidxr.bench import scale
from covidxr.bench.common import Measure
from covidxr.bench.infer import measure_infer
from covidxr.bench.loader import measure_loader
from covidxr.bench.probe import measure_probe
from covidxr.bench.report import report
from covidxr.bench.train import measure_train
from covidxr.utils import OneLineParser, add_device_arg, int_at_least, pick_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    """Return the ``python -m covidxr.bench`` parser."""
    p = OneLineParser("python -m covidxr.bench", description=__doc__.splitlines()[0],
                      epilog="python -m covidxr.bench scale --help: the data stages at dataset size N")
    p.add_argument("--arch", default="resnet50", help="architecture measured (default: %(default)s)")
    p.add_argument("--img-size", type=int_at_least(16), default=224, help="network input side (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=int_at_least(1), default=16, help="training and loader batch size")
    p.add_argument("--steps", type=int_at_least(1), default=4, help="timed training steps and inference batches")
    p.add_argument("--images", type=int_at_least(1), default=128, help="real images per loader / probe epoch")
    p.add_argument("--loader-images", type=int_at_least(0), default=0, help="images per loader epoch (0: all)")
    p.add_argument("--repeats", type=int_at_least(1), default=5,
                   help="short timings (loader epochs, head epochs, inference): median and range of this many runs")
    p.add_argument("-j", "--workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="loader processes")
    p.add_argument("--data", help="dataset (default: $COVIDXR_DATA, then data/cxr)")
    p.add_argument("--cache-dir", help="prepared cache to use (default: a fresh temporary one, timed)")
    add_device_arg(p)
    p.add_argument("--only", nargs="+", choices=("train", "train-real", "loader", "probe", "infer"),
                   help="measurements to run (default: all; train-real, training fed by the real loaders, only "
                        "on CUDA, where the loader can be the bottleneck)")
    p.add_argument("--peak-tflops", type=float, help="device peak for model FLOP utilisation")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def run_child(spec: dict) -> Measure:
    """Run one measurement described by ``spec`` (``args``, ``case``, ``variant``) in this process."""
    args = argparse.Namespace(**spec["args"])
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    case, variant = spec["case"], spec["variant"]
    if case.startswith("infer"):
        return measure_infer(args, device, variant, int(case.removeprefix("infer")))
    return {"train": measure_train, "loader": measure_loader, "probe": measure_probe}[case](args, device, variant)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (``covidxr.utils.run_cli``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["scale"]:
        return scale.main(argv[1:])

    def bench(args: argparse.Namespace) -> None:
        if args.child:
            print(json.dumps(asdict(run_child(json.loads(args.child)))))
            return
        with contextlib.ExitStack() as stack:
            if not args.cache_dir:
                args.cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="covidxr-bench-"))
            lines = report(args, argv)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print("\n".join([*lines, f"- load average at the end: {load}"]))

    return run_cli(get_args_parser(), bench, argv)


if __name__ == "__main__":
    sys.exit(main())
