"""What every benchmark measurement shares: the result record, timing, peak memory, the model and the real images.

These run in the child process of one measurement (``python -m covidxr.bench --child SPEC``), so that its peak
memory is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from covidxr.data.cache import fill_cache
from covidxr.data.manifest import load_manifest, resolve_data_path
from covidxr.networks.architectures import XrayClassifier, build_model
from covidxr.preprocessing.transforms import cache_size
from covidxr.utils import amp_dtype, autocast

MB = 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what the notebook-style loader can open


@dataclass
class Measure:
    """One variant of one measurement, as a child process reports it."""

    value: float  # img/s, or seconds for epochs
    how: str
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def peaks(device: torch.device) -> tuple[float, float]:
    """Return this process's peak RSS and (on CUDA) peak allocated GPU memory, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else 0.0
    return rss, gpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``fn``."""
    seconds = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def rate(work: float, seconds: list[float], how: str, device: torch.device, extra: dict | None = None) -> Measure:
    """A throughput measurement: ``work`` per second at the median run, with every run's rate kept (``rates``)."""
    rss, gpu = peaks(device)
    rates = [work / s for s in seconds]
    return Measure(float(np.median(rates)), how, rss, gpu, {**(extra or {}), "rates": rates})


def bench_model(args: argparse.Namespace, device: torch.device, num_classes: int = 3) -> XrayClassifier:
    """Return a randomly initialised ``--arch`` classifier on ``device``."""
    return build_model(args.arch, num_classes, "none").to(device)


def amp_context(device: torch.device, on: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Return the project's autocast factory for ``device`` when ``on``, else a no-op."""
    return autocast(device, amp_dtype(device) if on else None)


def real_subset(args: argparse.Namespace, count: int | None = None) -> tuple[list[str], list[int]]:
    """Return ``count`` (default ``--images``) real image paths of ``--data``, drawn with seed 0, and their targets."""
    table = load_manifest(resolve_data_path(args.data))
    table = table[table["path"].str.lower().str.endswith(IMAGE_SUFFIXES)]
    rows = np.random.default_rng(0).permutation(len(table))[: count or args.images]
    classes = sorted(table["label"].unique())
    sub = table.iloc[np.sort(rows)]
    return sub["path"].tolist(), [classes.index(c) for c in sub["label"]]


def cached_images(args: argparse.Namespace, paths: list[str]) -> list[np.ndarray | None]:
    """Return the decode-once squares of ``paths`` from ``--cache-dir`` (decoding what is missing)."""
    return fill_cache(paths, cache_size(args.img_size), Path(args.cache_dir), workers=0, progress=False).images
