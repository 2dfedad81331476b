"""The parent side of ``python -m covidxr.bench``: every measurement in a fresh process, one Markdown table.

Each variant runs as ``python -m covidxr.bench --child SPEC`` so that its peak memory is its own; the table puts the
plain way and the project's way side by side with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from covidxr.bench.common import Measure, real_subset
from covidxr.data.cache import fill_cache
from covidxr.preprocessing.transforms import cache_size
from covidxr.utils import pick_device

# Dense tensor-core TFLOP/s (bf16/fp16, no sparsity) by device-name fragment; --peak-tflops overrides.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0), ("4090", 165.0))


def measure(args: argparse.Namespace, case: str, variant: str) -> Measure | str:
    """Run one measurement in a fresh interpreter; return it, or the error's last line."""
    spec = json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"}, "case": case,
                       "variant": variant})
    proc = subprocess.run([sys.executable, "-m", "covidxr.bench", "--child", spec], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {tail}"
    return Measure(**json.loads(lines[-1]))


def machine_line(device_name: str) -> str:
    """One line about the machine: CPU, cores, torch threads, load average, device."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load} (shared machine: timings are noisy); "
            f"device: {device_name}")


def peak_tflops(args: argparse.Namespace, device_name: str) -> float | None:
    """The device's dense bf16/fp16 peak: --peak-tflops, else the table by name, else None."""
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for key, v in PEAK_TFLOPS if key in device_name), None)


def _fmt(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def table_row(name: str, unit: str, plain: Measure | str, ours: Measure | str, higher_is_better: bool) -> str:
    """One Markdown row: measurement, both ways with their numbers, the ratio and peak memory."""
    if isinstance(plain, str) or isinstance(ours, str):
        return f"| {name} | {plain if isinstance(plain, str) else plain.how} | " \
               f"{ours if isinstance(ours, str) else ours.how} | | | | |"
    ratio = ours.value / plain.value if higher_is_better else plain.value / ours.value
    mem = f"{plain.peak_rss_mb:,.0f} / {ours.peak_rss_mb:,.0f}"
    if plain.peak_gpu_mb or ours.peak_gpu_mb:
        mem += f" (GPU {plain.peak_gpu_mb:,.0f} / {ours.peak_gpu_mb:,.0f})"
    spread = ""
    if len(plain.extra.get("rates", ())) > 1 and len(ours.extra.get("rates", ())) > 1:
        # the i-th run of each side against each other: how far the ratio moves between repeats
        ratios = [o / p for o, p in zip(ours.extra["rates"], plain.extra["rates"], strict=False)]
        spread = f" ({min(ratios):.1f}–{max(ratios):.1f}, {len(ratios)} runs)"
    return (f"| {name} | {plain.how}: {_value(plain)} {unit} | {ours.how}: {_value(ours)} {unit} | "
            f"**{ratio:.1f}x**{spread} | {mem} |")


def _value(measure: Measure) -> str:
    """The median, with the range of the runs when there were several."""
    rates = measure.extra.get("rates", ())
    return _fmt(measure.value) + (f" ({_fmt(min(rates))}–{_fmt(max(rates))})" if len(rates) > 1 else "")


def fill_bench_cache(args: argparse.Namespace) -> str:
    """Fill the cache for the loader/probe subset (a fresh temporary one unless --cache-dir); return a note."""
    paths, _ = real_subset(args, max(args.images, args.loader_images) if args.loader_images else 10**9)  # superset
    start = time.perf_counter()
    filled = fill_cache(paths, cache_size(args.img_size), Path(args.cache_dir), workers=args.workers, progress=False)
    seconds = time.perf_counter() - start
    decoded = len(paths) - filled.reused
    return (f"decode once (`covidxr.data.cache.fill_cache`, {args.workers} processes): {decoded} images decoded, "
            f"{filled.reused} reused, in {seconds:.1f}s ({decoded / max(seconds, 1e-9):.1f} img/s)")


def report(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Run the selected measurements and return the table's lines (and notes)."""
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not args.only:
        args.only = ["train", "loader", "probe", "infer"] + (["train-real"] if device.type == "cuda" else [])
    lines = [f"`python -m {' '.join(['covidxr.bench', *argv])}`", "", machine_line(name),
             f"{args.arch} at {args.img_size} px, batch {args.batch_size}, {args.steps} timed steps, "
             f"{args.loader_images or 'all'} real images per loader epoch, {args.images} per probe epoch", "",
             "| measurement | plain way | project's way | speed-up | peak RSS MB plain / project |",
             "|---|---|---|---|---|"]
    notes = []
    if {"loader", "probe", "train-real"} & set(args.only):
        notes.append(fill_bench_cache(args))
    if "train" in args.only:
        plain = measure(args, "train", "plain")
        if device.type == "cuda":
            ours = measure(args, "train", "project")
        else:
            ours = plain if isinstance(plain, str) else Measure(**{**asdict(plain), "how": "the same on CPU "
                                                                   "(AMP and channels_last are for CUDA)"})
        lines.append(table_row("training, synthetic", "img/s", plain, ours, True))
        notes += flops_notes(args, plain, ours, name, device.type)
        if "train-real" in args.only:
            # The loader's cost: the same training steps fed by real images instead of ready tensors.
            for variant, label in (("device", "--gpu-cache"), ("workers", "loader processes"),
                                   ("raw", "loader processes, --no-cache")):
                lines.append(table_row(f"training, real loader ({label}) vs synthetic", "img/s", ours,
                                       measure(args, "train", variant), True))
    if "loader" in args.only:
        raw = measure(args, "loader", "raw")
        lines.append(table_row(f"loader epoch, same work (to {args.img_size} px tensors)", "img/s", raw,
                               measure(args, "loader", "cached"), True))
        lines.append(table_row("loader epoch, project adds training augmentation", "img/s", raw,
                               measure(args, "loader", "augmented"), True))
        lines.append(table_row("loader epoch, batched augmentation on the device", "img/s", raw,
                               measure(args, "loader", "device"), True))
    if "probe" in args.only:
        feats = measure(args, "probe", "features")
        lines.append(table_row("frozen-backbone epoch", "s", measure(args, "probe", "network"), feats, False))
        if isinstance(feats, Measure):
            notes.append(f"feature cache: one-off extraction {feats.extra['extract_seconds']:.1f}s for "
                         f"{args.images} images (un-augmented, eval mode), then every head epoch as above")
    if "infer" in args.only:
        for batch in (1, 32):
            lines.append(table_row(f"inference, batch {batch}", "img/s", measure(args, f"infer{batch}", "eager"),
                                   measure(args, f"infer{batch}", "project"), True))
    return lines + [""] + [f"- {n}" for n in notes]


def flops_notes(args: argparse.Namespace, plain: Measure | str, ours: Measure | str, name: str,
                device_type: str) -> list[str]:
    """Model FLOPs per image and utilisation (against the device's peak where known)."""
    if isinstance(plain, str) or isinstance(ours, str):
        return []
    flops = plain.extra["flops_per_image"]
    peak = peak_tflops(args, name) if device_type == "cuda" or args.peak_tflops else None
    notes = [f"training FLOPs (FlopCounterMode, forward + backward): {flops / 1e9:.1f} GFLOP per image"]
    for label, m in (("plain", plain), ("project", ours)) if device_type == "cuda" else (("training", plain),):
        achieved = flops * m.value / 1e12
        mfu = f", MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else ""
        notes.append(f"{label}: {achieved:.3f} TFLOP/s achieved{mfu}")
    if device_type == "cuda" and not peak:
        notes.append(f"no peak known for {name}: pass --peak-tflops for MFU")
    return notes

