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
  ``covidxr.onnx_backend`` can export, else channels_last + ``inference_mode``; the table says which).

Timings on a shared machine are noisy: short ones keep the best of ``--repeats`` runs, long ones (training
steps, the frozen-backbone epoch) run once, and the header records the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Dense tensor-core TFLOP/s (bf16/fp16, no sparsity) by device-name fragment; --peak-tflops overrides.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0), ("4090", 165.0))
MB = 2**20


@dataclass
class Measure:
    """One variant of one measurement, as a child process reports it."""

    value: float  # img/s, or seconds for epochs
    how: str
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def get_args_parser() -> argparse.ArgumentParser:
    """Return the ``python -m covidxr.bench`` parser."""
    p = argparse.ArgumentParser("python -m covidxr.bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("-b", "--batch-size", type=int, default=16, help="training and loader batch size")
    p.add_argument("--steps", type=int, default=4, help="timed training steps and inference batches")
    p.add_argument("--images", type=int, default=128, help="real images per loader / probe epoch")
    p.add_argument("--loader-images", type=int, default=0, help="images per loader epoch (0: all)")
    p.add_argument("--repeats", type=int, default=2,
                   help="short timings (loader epochs, head epochs, inference) keep the best of this many runs")
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1), help="loader processes")
    p.add_argument("--data", help="dataset (default: $COVIDXR_DATA, then data/cxr)")
    p.add_argument("--cache-dir", help="prepared cache to use (default: a fresh temporary one, timed)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--only", nargs="+", choices=("train", "train-real", "loader", "probe", "infer"),
                   help="measurements to run (default: all; train-real, training fed by the real loaders, only "
                        "on CUDA, where the loader can be the bottleneck)")
    p.add_argument("--peak-tflops", type=float, help="device peak for model FLOP utilisation")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------ child side


def _peaks(device) -> tuple[float, float]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else 0.0
    return rss, gpu


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device, repeats: int = 1) -> float:
    """Seconds of ``fn``: the best of ``repeats`` runs (other users' jobs only ever add time)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _model(args, device, num_classes: int = 3):
    from covidxr.models import build_model

    return build_model(args.arch, num_classes, "none").to(device)


def _amp(device, on: bool):
    from covidxr.utils import amp_dtype, autocast

    return autocast(device, amp_dtype(device) if on else None)


WARMUP_STEPS = 3  # untimed: cuDNN autotuning, allocator growth, loader start-up


def _train_batches(args, device, variant: str, total: int):
    """``total`` training batches for ``variant``: synthetic tensors, or real images through a project loader."""
    import numpy as np
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from covidxr.data.dataset import DeviceBatches, XrayDataset
    from covidxr.preprocess import cache_size, train_transform

    b = args.batch_size
    if variant in ("plain", "project"):
        x = torch.rand(b, 1, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 3, (b,), device=device)
        return [(x, y, torch.arange(b))] * total, "synthetic tensors"
    paths, targets = _subset(args, args.loader_images or 10**9)
    images = _prepared(args, paths) if variant != "raw" else None
    # Drawn with replacement so that any number of steps fits a small dataset, every batch full.
    sampler = RandomSampler(range(len(paths)), replacement=True, num_samples=total * b,
                            generator=torch.Generator().manual_seed(0))
    if variant == "device":
        stacked = torch.from_numpy(np.stack(images)).to(device)
        loader = DeviceBatches(stacked, range(len(paths)), targets, BatchSampler(sampler, b, True), args.img_size,
                               augment_seed=0)
        return loader, f"--gpu-cache: {len(paths)} real images, batched augmentation on {device.type}"
    cached = variant == "workers"
    ds = XrayDataset(paths, targets, cache_size(args.img_size), train_transform(args.img_size),
                     images if cached else None)
    loader = DataLoader(ds, batch_size=b, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    source = "decode-once cache" if cached else "--no-cache: every image decoded on each use"
    return loader, f"{source}, {len(paths)} real images, augmentation in {args.workers} workers"


def measure_train(args, device, variant: str) -> Measure:
    """Training img/s through the project's training loop.

    ``plain``: fp32 NCHW on synthetic tensors (the notebook way). ``project``: AMP + channels_last on CUDA,
    synthetic tensors. ``device`` / ``workers`` / ``raw``: the project's settings fed by a real loader
    (``--gpu-cache``; the decode-once cache with augmentation in loader processes; or those processes decoding
    every image on each use, ``--no-cache``).
    """
    import itertools

    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from covidxr.training import engine

    fast = variant != "plain" and device.type == "cuda"
    model = _model(args, device)
    if fast:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    amp = _amp(device, fast)
    dtype = torch.float16 if fast and not torch.cuda.is_bf16_supported() else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches, source = _train_batches(args, device, variant, WARMUP_STEPS + args.steps)
    stream = iter(batches)

    def steps(n: int) -> None:
        engine.train_one_epoch(model, itertools.islice(stream, n), nn.CrossEntropyLoss(), optimizer, scheduler,
                               scaler, device, amp, channels_last=fast, progress=False)

    steps(WARMUP_STEPS)
    seconds = _timed(lambda: steps(args.steps), device)
    extra = {}
    if variant == "plain":
        with FlopCounterMode(display=False) as counter:
            engine.train_one_epoch(model, batches[:1], nn.CrossEntropyLoss(), optimizer, scheduler, scaler, device,
                                   amp, progress=False)
        extra["flops_per_image"] = counter.get_total_flops() / args.batch_size
    how = ("AMP + channels_last" if fast else "fp32, NCHW") + f", {source}"
    rss, gpu = _peaks(device)
    return Measure(args.steps * args.batch_size / seconds, how, rss, gpu, extra)


def _subset(args, count: int | None = None) -> tuple[list[str], list[int]]:
    import numpy as np

    from covidxr.data.manifest import load_manifest, resolve_data_path

    table = load_manifest(resolve_data_path(args.data))
    table = table[table["path"].str.lower().str.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))]
    rows = np.random.default_rng(0).permutation(len(table))[: count or args.images]
    classes = sorted(table["label"].unique())
    sub = table.iloc[np.sort(rows)]
    return sub["path"].tolist(), [classes.index(c) for c in sub["label"]]


def _prepared(args, paths: list[str]):
    from covidxr.data.cache import prepare
    from covidxr.preprocess import cache_size

    return prepare(paths, cache_size(args.img_size), Path(args.cache_dir), workers=0, progress=False).images


class NotebookDataset:
    """The plain way: ``ImageFolder``'s PIL loader (RGB), ``Resize`` and ``ToTensor`` on every access."""

    def __init__(self, paths: list[str], targets: list[int], img_size: int) -> None:
        from torchvision import transforms

        self.paths, self.targets = paths, targets
        self.transform = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(self.paths[index])), self.targets[index]


def measure_loader(args, device, variant: str) -> Measure:
    """One epoch of a shuffled loader over ``--images`` real images, batches only consumed."""
    import numpy as np
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from covidxr.data.dataset import DeviceBatches, XrayDataset
    from covidxr.preprocess import cache_size, eval_transform, train_transform

    paths, targets = _subset(args, args.loader_images or 10**9)
    generator = torch.Generator().manual_seed(0)
    if variant == "raw":
        ds, how = NotebookDataset(paths, targets, args.img_size), "PIL decode + Resize + ToTensor each epoch"
    elif variant in ("cached", "augmented"):
        augment = variant == "augmented"
        transform = train_transform(args.img_size) if augment else eval_transform(args.img_size)
        ds = XrayDataset(paths, targets, cache_size(args.img_size), transform, _prepared(args, paths))
        how = "decode-once cache, " + ("training augmentation" if augment else "Resize")
    else:
        images = torch.from_numpy(np.stack(_prepared(args, paths))).to(device)
        batches = BatchSampler(RandomSampler(range(len(paths)), generator=generator), args.batch_size, False)
        loader = DeviceBatches(images, range(len(paths)), targets, batches, args.img_size, augment_seed=0)
        how = f"--gpu-cache: uint8 tensor on {device.type}, batched augmentation"
    if variant != "device":
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            pin_memory=device.type == "cuda", generator=generator)
        how += f", {args.workers} workers"

    def epoch() -> None:
        for images, *_ in loader:
            images.to(device, non_blocking=True)

    seconds = _timed(epoch, device, args.repeats)
    rss, gpu = _peaks(device)
    return Measure(len(paths) / seconds, how, rss, gpu)


def measure_probe(args, device, variant: str) -> Measure:
    """Seconds of one head-only epoch over ``--images`` real images."""
    import torch
    from torch import nn
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from covidxr.data.dataset import XrayDataset
    from covidxr.preprocess import cache_size, eval_transform, train_transform
    from covidxr.training import engine
    from covidxr.training import head_features as features

    paths, targets = _subset(args)
    model = _model(args, device)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp, criterion, images = _amp(device, device.type == "cuda"), nn.CrossEntropyLoss(), _prepared(args, paths)
    fast = device.type == "cuda"
    extra = {}
    if variant == "network":
        ds = XrayDataset(paths, targets, cache_size(args.img_size), train_transform(args.img_size), images)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(0))
        seconds = _timed(lambda: engine.train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device,
                                                        amp, channels_last=fast, frozen_backbone=True,
                                                        progress=False), device)
        how = "augmented images through the frozen backbone"
    else:
        ds = XrayDataset(paths, targets, cache_size(args.img_size), eval_transform(args.img_size), images)
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
        start = time.perf_counter()
        feats = features.assemble(*features.extract_features(model, loader, device, amp, progress=False), len(ds))
        extra["extract_seconds"] = time.perf_counter() - start
        batches = BatchSampler(RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)),
                               args.batch_size, drop_last=False)
        seconds = _timed(lambda: features.train_head_epoch(model.head, feats, batches, criterion, optimizer,
                                                           scheduler, scaler, amp, progress=False),
                         device, max(5, args.repeats))
        how = "head on cached features (--linear-probe)"
    rss, gpu = _peaks(device)
    return Measure(seconds, how, rss, gpu, extra)


def _onnx_runner(model, img_size: int):
    """The project's CPU inference path when ``covidxr.onnx_backend`` is there and exports; else None."""
    try:
        from covidxr.inference import onnx_backend
    except ImportError:
        return None, "covidxr.onnx_backend not found"
    if not onnx_backend.onnxruntime_available():
        return None, "onnxruntime not installed"
    reasons = []
    for exporter in ("legacy", "dynamo"):
        try:
            data = onnx_backend.export_bytes(model, img_size, {}, exporter=exporter)
            return onnx_backend.OnnxRunner(data), f"ONNX Runtime ({exporter} export)"
        except Exception as exc:  # noqa: BLE001 - any failure means: measure the torch path instead
            reasons.append(f"{exporter}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return None, "; ".join(reasons)


def measure_infer(args, device, variant: str, batch: int) -> Measure:
    """Inference img/s at ``batch`` on random inputs."""
    import torch

    model = _model(args, device).eval()
    x = torch.rand(batch, 1, args.img_size, args.img_size, device=device)
    iterations = max(args.steps, 8) if batch == 1 else 1
    note = ""
    if variant == "eager":
        how = "torch eager fp32, no_grad"

        def call() -> None:
            with torch.no_grad():
                model(x)
    else:
        runner, note = _onnx_runner(model, args.img_size) if device.type == "cpu" else (None, "CUDA")
        if runner is not None:
            how, array = note, x.cpu().numpy()

            def call() -> None:
                runner.logits(array)
        else:
            fast = device.type == "cuda"
            model.to(memory_format=torch.channels_last)
            xl = x.contiguous(memory_format=torch.channels_last)
            amp = _amp(device, fast)
            how = "channels_last + inference_mode" + (" + AMP" if fast else "") + (f" ({note})" if note else "")

            def call() -> None:
                with torch.inference_mode(), amp():
                    model(xl)
    call()  # warm-up
    seconds = _timed(lambda: [call() for _ in range(iterations)], device, args.repeats)
    rss, gpu = _peaks(device)
    return Measure(iterations * batch / seconds, how, rss, gpu)


def run_child(spec: dict) -> Measure:
    """Run one measurement described by ``spec`` (``args``, ``case``, ``variant``) in this process."""
    import torch

    from covidxr.utils import pick_device

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


# ----------------------------------------------------------------------------------------------- parent side


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
    import torch

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
    return (f"| {name} | {plain.how}: {_fmt(plain.value)} {unit} | {ours.how}: {_fmt(ours.value)} {unit} | "
            f"**{ratio:.1f}x** | {mem} |")


def prepare_cache(args: argparse.Namespace) -> str:
    """Fill the cache for the loader/probe subset (a fresh temporary one unless --cache-dir); return a note."""
    from covidxr.data.cache import prepare
    from covidxr.preprocess import cache_size

    paths, _ = _subset(args, max(args.images, args.loader_images) if args.loader_images else 10**9)  # superset
    start = time.perf_counter()
    prepared = prepare(paths, cache_size(args.img_size), Path(args.cache_dir), workers=args.workers, progress=False)
    seconds = time.perf_counter() - start
    decoded = len(paths) - prepared.reused
    return (f"decode once (`covidxr.data.cache.prepare`, {args.workers} processes): {decoded} images decoded, "
            f"{prepared.reused} reused, in {seconds:.1f}s ({decoded / max(seconds, 1e-9):.1f} img/s)")


def report(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Run the selected measurements and return the table's lines (and notes)."""
    import torch

    from covidxr.utils import pick_device

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
        notes.append(prepare_cache(args))
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = get_args_parser().parse_args(argv)
    if args.child:
        result = run_child(json.loads(args.child))
        print(json.dumps(asdict(result)))
        return 0
    with contextlib.ExitStack() as stack:
        if not args.cache_dir:
            args.cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="covidxr-bench-"))
        lines = report(args, sys.argv[1:] if argv is None else argv)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print("\n".join([*lines, f"- load average at the end: {load}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
