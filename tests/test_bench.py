"""``python -m covidxr.bench`` end to end on the real shared images, tiny settings: every comparison is measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from covidxr.bench import __main__ as bench
from covidxr.bench.common import Measure
from covidxr.bench.report import flops_notes, table_row

pytestmark = pytest.mark.slow  # the benchmarks run end to end on real images


def table_rows(out: str) -> dict[str, str]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    return {row.split("|")[1].strip(): row for row in rows}


def test_bench_measures_every_comparison(small_manifest: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(small_manifest), "--arch", "resnet18", "--img-size", "32", "-b", "4", "--steps", "1",
            "--images", "8", "--loader-images", "8", "--repeats", "1", "-j", "0", "--device", "cpu",
            "--cache-dir", str(tmp_path), "--only", "train", "train-real", "loader", "probe", "infer"]
    assert bench.main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {
        "training, synthetic", "training, real loader (--gpu-cache) vs synthetic",
        "training, real loader (loader processes) vs synthetic",
        "training, real loader (loader processes, --no-cache) vs synthetic",
        "loader epoch, same work (to 32 px tensors)", "loader epoch, project adds training augmentation",
        "loader epoch, batched augmentation on the device",
        "frozen-backbone epoch", "inference, batch 1", "inference, batch 32"}
    for name, row in rows.items():
        # A failed child leaves the ratio cell empty; a measured one shows both values and their ratio.
        assert re.search(r"\*\*\d+(\.\d)?x\*\*", row), f"{name} was not measured: {row}"
    assert "real images" in rows["training, real loader (--gpu-cache) vs synthetic"]
    assert any(p.suffix == ".npy" for p in tmp_path.iterdir()), "the loader rows did not use the prepared cache"


def test_bench_reports_a_failed_measurement_in_its_row() -> None:
    failed = table_row("x", "img/s", "failed: CUDA out of memory", Measure(1.0, "ours"), True)
    assert "failed: CUDA out of memory" in failed and "**" not in failed


def test_flops_notes_give_utilisation_against_the_known_peak() -> None:
    import argparse

    args = argparse.Namespace(peak_tflops=None)
    plain = Measure(1000.0, "plain", extra={"flops_per_image": 24.3e9})
    ours = Measure(4000.0, "ours")
    notes = flops_notes(args, plain, ours, "NVIDIA H100 80GB HBM3", "cuda")
    assert any("MFU 2.5% of 989" in n for n in notes)  # 24.3 TFLOP/s of 989
    assert any("MFU 9.8% of 989" in n for n in notes)  # 97.2 TFLOP/s of 989


def test_onnx_benchmark_times_every_session_variant_and_profiles_the_operators() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_onnx.py"), "--arch", "resnet18",
                           "--img-size", "32", "--repeats", "1"], capture_output=True, text=True, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timed = [line for line in proc.stdout.splitlines() if re.fullmatch(r".+\s+\d+\.\d\s+\d+\.\d\d", line)]
    assert [line.split("  ")[0] for line in timed][:3] == [
        "torch eager, no_grad", "ORT, dynamo export (the project's session)", "ORT, legacy export"]
    assert len(timed) == 7
    assert re.search(r"operator \(project session\): Conv \d+\.\d% \(20 per run\)", proc.stdout), proc.stdout
