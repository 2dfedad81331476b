"""``python -m covidxr.bench`` end to end on the real shared images, tiny settings: every comparison is measured;
``python -m covidxr.bench scale`` at 200 images: every data stage runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
import pytest

from covidxr.bench import __main__ as bench
from covidxr.bench.common import Measure
from covidxr.bench.report import flops_notes, table_row


def table_rows(out: str) -> dict[str, str]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    return {row.split("|")[1].strip(): row for row in rows}


@pytest.mark.slow
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
    args = argparse.Namespace(peak_tflops=None)
    plain = Measure(1000.0, "plain", extra={"flops_per_image": 24.3e9})
    ours = Measure(4000.0, "ours")
    notes = flops_notes(args, plain, ours, "NVIDIA H100 80GB HBM3", "cuda")
    assert any("MFU 2.5% of 989" in n for n in notes)  # 24.3 TFLOP/s of 989
    assert any("MFU 9.8% of 989" in n for n in notes)  # 97.2 TFLOP/s of 989


@pytest.mark.slow
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


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_at_200_images(shared_data: Path, tmp_path: Path) -> None:
    """``python -m covidxr.bench scale`` at N = 200 with tiny settings: every stage ran and left its output."""
    import json

    from covidxr.bench.scale_stages import STAGES, paths

    out = tmp_path / "results"
    argv = ["scale", "--images", "200", "--films", "40", "--img-size", "32", "--bootstrap", "20", "-j", "1",
            "--out", str(out), "--tmp", str(tmp_path), "--keep"]
    assert bench.main(argv) == 0
    report = json.loads((out / "scale.json").read_text())
    (result,) = report["results"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == list(STAGES) and not [s for s in stages.values() if "error" in s]
    assert all(s["seconds"] >= 0 and s["peak_mb"] > 0 for s in stages.values())
    where = paths(Path(result["work"]))
    assert len(pd.read_csv(where.dataset)) == 200 and result["generate"]["disk_mb"] > 0
    assert stages["manifest"]["images"] == 200 and where.manifest.is_file()
    assert stages["audit"]["images"] == 200 and stages["audit"]["exact_duplicates"] == 0  # no two files identical
    assert (where.audit / "audit.md").is_file()
    assert stages["split"]["train"] + stages["split"]["val"] + stages["split"]["test"] == 200
    assert stages["decode"]["entries"] == 200 and stages["decode"]["disk_mb"] > 0
    assert stages["loader"]["batches"] > 0 and stages["loader"]["images"] == stages["loader"]["batches"] * 32
    assert stages["evaluate"]["images"] == 200 and (where.eval / "metrics.json").is_file()
    assert stages["readback"]["rows"] == 200 and stages["readback"]["tables"] == 6
    table = (out / "scale.md").read_text()
    assert "| audit | " in table and "load average" in table.lower()


def test_scale_fit_gives_the_growth_exponent() -> None:
    from covidxr.bench.scale import fits

    results = [{"n": n, "stages": [{"stage": "x", "seconds": 1e-6 * n**2, "peak_mb": 600 + n / 10,
                                    "baseline_mb": 500}]}
               for n in (1000, 5000)]
    fit = fits(results)["x"]
    assert fit["exponent"] == pytest.approx(2.0) and fit["mb_per_1000_images"] == pytest.approx(100.0)
    assert fit["seconds_at_30000_extrapolated"] == pytest.approx(900.0)
