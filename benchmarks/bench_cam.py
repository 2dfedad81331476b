"""Benchmark: prediction alone vs. prediction + Grad-CAM, the usual pytorch-grad-cam way and with the short backward.

Usage::

    python benchmarks/bench_cam.py [--arch resnet50] [--weights none] [--img-size 224] [--images 20]
        [--data PATH] [--method gradcam] [--threads N] [--exporter dynamo|legacy] [--warmup 3]

The model is built once (random init with ``--weights none``), the images (real X-rays of the shared data, spread
over the classes) are decoded and letterboxed once, outside the timings. Then for each image, batch 1, in turn:

* ``torch``: prediction alone, PyTorch eager under ``torch.inference_mode()`` (logits and softmax);
* ``onnxruntime``: prediction alone, ONNX Runtime on the CPU (the model exported once, in memory);
* ``cam usual``: :func:`covidxr.model.cam.compute_cam` with ``efficient=False``: pytorch-grad-cam as usually run,
  every parameter requiring grad, so the backward runs through the whole network (one forward pass, whose logits
  give the prediction);
* ``cam efficient``: the same call with ``efficient=True`` (backward stops at the target layer).

Each figure is the median over the images, after ``--warmup`` untimed rounds on the first image. The heatmaps of
the two CAM variants are compared (max abs difference). Torch and ONNX Runtime use ``--threads`` threads
(default: torch's default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidxr.data.manifest import load_manifest, resolve_data_path
from covidxr.images.reader import load_xray
from covidxr.inference.onnx_backend import OnnxRunner, export_bytes
from covidxr.model.cam import compute_cam
from covidxr.networks.architectures import build_model
from covidxr.preprocessing.transforms import letterbox


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--weights", default="none", help="none (random init), imagenet or a path")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=20, help="number of real images (median over them)")
    parser.add_argument("--data", help="dataset folder or manifest (default: $COVIDXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args(argv)


def real_images(data: str | None, count: int, size: int) -> list[torch.Tensor]:
    """Decode ``count`` real X-rays (round-robin over the classes) and letterbox them to ``(1, 1, size, size)``."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
    table = load_manifest(resolve_data_path(data or (default if default.is_dir() else None)))
    order = table.groupby("label", sort=False).cumcount()
    table = table.assign(_order=order).sort_values(["_order", "label"], kind="stable").head(count)
    return [letterbox(load_xray(path).pixels, size)[None] for path in table["path"]]


def timed(fn: Callable[[], object]) -> float:
    """Run ``fn`` once and return its wall time in milliseconds."""
    start = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = real_images(args.data, args.images, args.img_size)
    torch.manual_seed(0)
    model = build_model(args.arch, 3, args.weights).eval()
    start = time.perf_counter()
    runner = OnnxRunner(export_bytes(model, args.img_size, {}, args.exporter))
    export_s = time.perf_counter() - start

    def predict_torch(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(x), dim=1).numpy()

    def predict_onnx(x: torch.Tensor) -> np.ndarray:
        logits = runner.logits(x)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    variants: dict[str, Callable[[torch.Tensor], object]] = {
        "torch": predict_torch,
        "onnxruntime": predict_onnx,
        "cam usual": lambda x: compute_cam(model, x, args.method, efficient=False),
        "cam efficient": lambda x: compute_cam(model, x, args.method, efficient=True),
    }
    for _ in range(args.warmup):
        for fn in variants.values():
            fn(images[0])
    times: dict[str, list[float]] = {name: [] for name in variants}
    max_diff, probs_gap = 0.0, 0.0
    for x in images:
        for name, fn in variants.items():
            times[name].append(timed(lambda fn=fn, x=x: fn(x)))
        usual = compute_cam(model, x, args.method, efficient=False)
        fast = compute_cam(model, x, args.method, efficient=True)
        max_diff = max(max_diff, float(np.abs(usual.maps - fast.maps).max()))
        probs_gap = max(probs_gap, float(np.abs(predict_onnx(x) - predict_torch(x)).max()))

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.arch} @ {args.img_size} px, weights {args.weights}, batch 1, {len(images)} real images, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, CAM {args.method}; "
          f"ONNX export ({args.exporter}) {export_s:.1f} s")
    rows = [{"variant": name, "median ms": round(value, 1), "p10 ms": round(float(np.percentile(times[name], 10)), 1),
             "p90 ms": round(float(np.percentile(times[name], 90)), 1),
             "x torch predict": round(value / median["torch"], 2)} for name, value in median.items()]
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"cam efficient / cam usual: {median['cam efficient'] / median['cam usual']:.2f}; "
          f"cam efficient / onnxruntime predict: {median['cam efficient'] / median['onnxruntime']:.2f}; "
          f"max |usual - efficient| heatmap difference: {max_diff:.2e}; "
          f"max |onnxruntime - torch| probability difference: {probs_gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
