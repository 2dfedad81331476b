"""Benchmark: ONNX Runtime session settings against PyTorch eager at batch 1, and where ONNX Runtime spends its time.

Usage::

    python benchmarks/bench_onnx.py [--arch resnet50] [--img-size 224] [--repeats 20]

The model (random init) is exported once per exporter, in memory. Every variant runs the same random
``(1, 1, S, S)`` input ``--repeats`` times after two warm-up runs and reports the median. Variants: torch eager
(``no_grad``); the project's session (:class:`covidxr.inference.onnx_backend.OnnxRunner` on the default dynamo export:
all graph optimisations, torch's thread count); then sessions differing from it in one setting each: exporter,
thread count, optimisation level, a static batch dimension. Last, ONNX Runtime's own profiler splits the
project session's kernel time by operator type.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from covidxr.inference.onnx_backend import export_bytes
from covidxr.networks.architectures import build_model


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after two untimed runs."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def session(model: bytes, threads: int, level: str = "ORT_ENABLE_ALL", profile_dir: str | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and optimisation ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def static_export(model: torch.nn.Module, img_size: int) -> bytes:
    """The legacy export with a fixed batch of one (the project's exports have a dynamic batch)."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.rand(1, 1, img_size, img_size),), buffer, dynamo=False, input_names=["images"],
                      output_names=["logits"])
    return buffer.getvalue()


def operator_shares(model: bytes, threads: int, array: np.ndarray, runs: int) -> list[tuple[str, float, float]]:
    """Per operator type over ``runs`` profiled runs, largest first: share of kernel time, kernels per run."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, threads, profile_dir=tmp)
        name = sess.get_inputs()[0].name
        for _ in range(runs):
            sess.run(None, {name: array})
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
    whole = sum(totals.values()) or 1
    return [(op, value / whole, calls[op] / runs) for op, value in totals.most_common()]


def main(argv: list[str] | None = None) -> int:
    """Print the timings table and the operator shares."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    model = build_model(args.arch, 3, "none").eval()
    x = torch.rand(1, 1, args.img_size, args.img_size)
    array = x.numpy()
    exports = {exporter: export_bytes(model, args.img_size, {}, exporter=exporter) for exporter in ("legacy", "dynamo")}

    def ort_call(model_bytes: bytes, n_threads: int = threads, level: str = "ORT_ENABLE_ALL") -> Callable[[], object]:
        sess = session(model_bytes, n_threads, level)
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: array})

    with torch.no_grad():
        eager = median_ms(lambda: model(x), args.repeats)
    rows = [("torch eager, no_grad", eager)]
    base = exports["dynamo"]  # what covidxr.predict and covidxr.export write by default
    rows.append(("ORT, dynamo export (the project's session)", median_ms(ort_call(base), args.repeats)))
    rows.append(("ORT, legacy export", median_ms(ort_call(exports["legacy"]), args.repeats)))
    for n in sorted({1, threads + 1} - {threads}):
        rows.append((f"ORT, {n} thread(s)", median_ms(ort_call(base, n), args.repeats)))
    rows.append(("ORT, extended optimisations only", median_ms(ort_call(base, level="ORT_ENABLE_EXTENDED"),
                                                               args.repeats)))
    rows.append(("ORT, legacy export with a static batch of 1",
                 median_ms(ort_call(static_export(model, args.img_size)), args.repeats)))

    print(f"{args.arch} at {args.img_size} px, batch 1, torch {torch.__version__} with {threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'variant':<50} {'ms':>8} {'x eager':>8}")
    for label, ms in rows:
        print(f"{label:<50} {ms:8.1f} {eager / ms:8.2f}")
    shares = operator_shares(base, threads, array, runs=12)
    print("ONNX Runtime kernel time by operator (project session): "
          + ", ".join(f"{op} {100 * share:.1f}% ({per_run:g} per run)" for op, share, per_run in shares[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
