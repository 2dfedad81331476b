"""Training-step throughput of eager against ``torch.compile`` (and CUDA graphs), fed by synthetic tensors and by the
real ``--gpu-cache`` loader, with model FLOP utilisation.

Every variant runs the project's own training step (``covidxr.training.engine.train_one_epoch``: bf16 autocast where
supported, channels_last, fused AdamW on CUDA) on the project's model (``covidxr.networks.architectures.build_model``).
The real-loader rows cut batches from a uint8 array of letterboxed squares (``--squares``, made here with
``--make-squares`` from a
covidxr dataset: the decode-once cache's squares) with :class:`covidxr.data.dataset.DeviceBatches`, exactly what
``python -m covidxr.train --gpu-cache on`` does.

    python benchmarks/bench_compile.py --make-squares ../shared/data/all.csv --squares /tmp/squares.npy
    python benchmarks/bench_compile.py --squares /tmp/squares.npy            # on the GPU machine
    python benchmarks/bench_compile.py --device cpu --arch resnet18 --img-size 64 -b 8 --steps 2 --modes eager

Prints one Markdown table (variant, img/s, ratio to eager, TFLOP/s, MFU, compile seconds, peak GPU MB).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from covidxr.data.dataset import DeviceBatches
from covidxr.networks.architectures import build_model
from covidxr.training import engine
from covidxr.utils import amp_dtype, autocast

# Peak dense bf16 tensor throughput without sparsity (NVIDIA data sheets), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MODES = ("eager", "default", "max-autotune-no-cudagraphs", "reduce-overhead")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--modes", nargs="+", default=["eager", "default", "reduce-overhead"], choices=MODES)
    parser.add_argument("--squares", type=Path, help="uint8 (N, S, S) .npy of letterboxed real images")
    parser.add_argument("--make-squares", metavar="DATA", help="write --squares from this covidxr dataset and exit")
    parser.add_argument("--limit", type=int, default=400, help="images taken by --make-squares")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def make_squares(data: str, out: Path, img_size: int, limit: int) -> None:
    """Decode ``limit`` images of ``data`` into the cache-size squares the training loader uses; save as .npy."""
    from covidxr.data.cache import fill_cache
    from covidxr.data.manifest import load_manifest, resolve_data_path
    from covidxr.preprocessing.transforms import cache_size

    table = load_manifest(resolve_data_path(data)).sample(frac=1.0, random_state=0).head(limit)
    prepared = fill_cache(list(table["path"]), cache_size(img_size), None, workers=2)
    good = [img for i, img in enumerate(prepared.images) if i not in prepared.failures]
    np.save(out, np.stack(good))
    print(f"{len(good)} squares of {cache_size(img_size)} px -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


def batches(args: argparse.Namespace, device: torch.device, source: str, total: int):
    """``total`` training batches: the same synthetic tensors each step, or real squares through DeviceBatches."""
    b = args.batch_size
    if source == "synthetic":
        x = torch.rand(b, 1, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 3, (b,), device=device)
        return [(x, y, torch.arange(b))] * total
    squares = torch.from_numpy(np.load(args.squares)).to(device)
    n = len(squares)
    sampler = RandomSampler(range(n), replacement=True, num_samples=total * b,
                            generator=torch.Generator().manual_seed(0))
    targets = [i % 3 for i in range(n)]
    return DeviceBatches(squares, range(n), targets, BatchSampler(sampler, b, True), args.img_size, augment_seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, device: torch.device, mode: str, source: str) -> dict:
    """Train ``--steps`` steps ``--repeats`` times after compilation and warm-up; return img/s and costs."""
    torch.manual_seed(0)
    model = build_model(args.arch, 3, "none").to(device).to(memory_format=torch.channels_last)
    step_model = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    dtype = amp_dtype(device)
    amp = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    stream = iter(batches(args, device, source, 1 + args.warmup + args.repeats * args.steps))

    def run(n: int) -> None:
        engine.train_one_epoch(step_model, (next(stream) for _ in range(n)), nn.CrossEntropyLoss(), optimizer,
                               scheduler, scaler, device, amp, channels_last=True, progress=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(1)  # compilation (and cuDNN autotuning) happen here
    sync(device)
    compile_s = time.perf_counter() - start
    run(args.warmup)
    rates = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        run(args.steps)
        sync(device)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"mode": mode, "source": source, "img_s": float(np.median(rates)), "img_s_range": [min(rates), max(rates)],
            "first_step_s": compile_s, "peak_gpu_mb": peak}


def flops_per_image(args: argparse.Namespace, device: torch.device) -> float:
    """Forward + backward FLOPs of one training image, counted by FlopCounterMode on the eager model."""
    model = build_model(args.arch, 3, "none").to(device)
    x = torch.rand(2, 1, args.img_size, args.img_size, device=device)
    with FlopCounterMode(display=False) as counter, autocast(device, amp_dtype(device))():
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table(rows: list[dict], flops: float, peak: float | None) -> list[str]:
    eager = {r["source"]: r["img_s"] for r in rows if r["mode"] == "eager"}
    out = ["| variant | images | img/s (median, range) | vs eager | TFLOP/s | MFU | first step s | peak GPU MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = r["img_s"] * flops / 1e12
        ratio = r["img_s"] / eager[r["source"]] if r["source"] in eager else float("nan")
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        lo, hi = r["img_s_range"]
        out.append(f"| {r['mode']} | {r['source']} | {r['img_s']:,.0f} ({lo:,.0f}–{hi:,.0f}) | {ratio:.2f}x | "
                   f"{tflops:.1f} | {mfu} | {r['first_step_s']:.1f} | {r['peak_gpu_mb']:,.0f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.make_squares:
        make_squares(args.make_squares, args.squares or Path("squares.npy"), args.img_size, args.limit)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(torch.__version__, torch.cuda.get_device_name(device))
    sources = ["synthetic"] + (["real --gpu-cache"] if args.squares else [])
    rows = []
    for mode in args.modes:
        for source in sources:
            try:
                rows.append(measure(args, device, mode, source))
                print(json.dumps(rows[-1]), flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others' numbers
                print(f"{mode} / {source}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    flops = flops_per_image(args, device)
    print(f"\n{args.arch} at {args.img_size} px, batch {args.batch_size}, {args.steps} steps x {args.repeats}; "
          f"{flops / 1e9:.1f} GFLOP per training image (FlopCounterMode)\n")
    print("\n".join(table(rows, flops, peak_tflops(device))))
    if args.json:
        args.json.write_text(json.dumps({"flops_per_image": flops, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
