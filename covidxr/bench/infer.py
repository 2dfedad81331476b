"""Inference img/s at batch 1 and 32: torch eager fp32 vs the project's path (ONNX Runtime where it exports on the
CPU, else channels_last + ``inference_mode``)."""

from __future__ import annotations

import argparse

import torch

from covidxr.bench.common import Measure, amp_context, bench_model, rate, timed
from covidxr.errors import one_line


def _onnx_runner(model: torch.nn.Module, img_size: int) -> tuple[object | None, str]:
    """The project's CPU inference path (an ``OnnxRunner``) and how it was made, or None and why not."""
    try:
        from covidxr.inference import onnx_backend
    except ImportError:
        return None, "covidxr.inference.onnx_backend not found"
    if not onnx_backend.onnxruntime_available():
        return None, "onnxruntime not installed"
    reasons = []
    for exporter in ("legacy", "dynamo"):
        try:
            data = onnx_backend.export_bytes(model, img_size, {}, exporter=exporter)
            return onnx_backend.OnnxRunner(data), f"ONNX Runtime ({exporter} export)"
        except Exception as exc:  # noqa: BLE001 - any failure means: measure the torch path instead
            reasons.append(f"{exporter}: {one_line(exc)}")
    return None, "; ".join(reasons)


def measure_infer(args: argparse.Namespace, device: torch.device, variant: str, batch: int) -> Measure:
    """Inference img/s at ``batch`` on random inputs."""
    model = bench_model(args, device).eval()
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
            amp = amp_context(device, fast)
            how = "channels_last + inference_mode" + (" + AMP" if fast else "") + (f" ({note})" if note else "")

            def call() -> None:
                with torch.inference_mode(), amp():
                    model(xl)
    call()  # warm-up
    return rate(iterations * batch, timed(lambda: [call() for _ in range(iterations)], device, args.repeats), how,
                device)
