"""Training survives faults: SIGKILL at any moment, unreadable files, failed saves, hostile checkpoints."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.errors import CheckpointError
from covidxr.model.checkpoint import load_checkpoint, save_checkpoint

TRAIN_ARGS = ["--arch", "resnet18", "--weights", "none", "--img-size", "48", "--epochs", "3", "--batch-size", "8",
              "--workers", "0", "--freeze-epochs", "1", "--patience", "0", "--seed", "7"]


def _train(manifest: Path, out: Path, extra: list[str] | None = None) -> subprocess.Popen:
    args = extra if extra is not None else ["--data", str(manifest), *TRAIN_ARGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "covidxr.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300.0) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)  # polling interval of the watcher, not a synchronisation delay
    return False


def _resume_or_restart(manifest: Path, out: Path) -> subprocess.Popen:
    last = out / "last.pt"
    return _train(manifest, out, ["--resume", str(last)] if last.exists() else None)


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_matches_uninterrupted_run(small_manifest: Path, tmp_path: Path) -> None:
    reference = _train(small_manifest, tmp_path / "ref")
    assert reference.wait() == 0, reference.stderr.read()

    run = tmp_path / "killed"
    kills = [
        lambda: (run / "split.csv").exists(),  # during the first epoch
        lambda: any(p.name.startswith(".last.pt.") for p in run.glob(".*.tmp")),  # while last.pt is being written
        lambda: (run / "history.csv").exists() and len((run / "history.csv").read_text().splitlines()) >= 3,
    ]
    killed = 0
    proc = _train(small_manifest, run)
    for condition in kills:
        killed += _kill_when(proc, condition)
        if proc.returncode not in (None, -signal.SIGKILL):
            break
        proc = _resume_or_restart(small_manifest, run)
    assert proc.wait() == 0, proc.stderr.read()
    assert killed >= 3
    ours, theirs = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "ref" / "last.pt")
    assert ours["epoch"] == theirs["epoch"] == 3
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert not list(run.glob(".*.tmp")), "a killed write left its temporary file behind and nothing cleaned it"


def _broken_dataset(small_manifest: Path, tmp_path: Path) -> Path:
    table = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    good = Path(table["path"].iloc[0]).read_bytes()
    bad = {"truncated.png": good[: len(good) // 3], "empty.png": b"", "report.png": b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n"}
    rows = []
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        rows.append({**table.iloc[0].to_dict(), "path": str(tmp_path / name), "patient_id": f"bad-{name}"})
    broken = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    out = tmp_path / "broken.csv"
    broken.to_csv(out, index=False)
    return out


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_listed(small_manifest: Path, tmp_path: Path) -> None:
    manifest = _broken_dataset(small_manifest, tmp_path)
    proc = _train(manifest, tmp_path / "run", ["--data", str(manifest), *TRAIN_ARGS[:-8], "--epochs", "1",
                                                "--out", str(tmp_path / "run")])
    stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr
    listed = pd.read_csv(tmp_path / "run" / "unreadable.csv")
    assert sorted(Path(p).name for p in listed["relpath"]) == ["empty.png", "report.png", "truncated.png"]
    assert "3 unreadable image(s) skipped" in stderr


@pytest.mark.slow
def test_strict_makes_unreadable_images_fatal_before_training(small_manifest: Path, tmp_path: Path) -> None:
    manifest = _broken_dataset(small_manifest, tmp_path)
    proc = _train(manifest, tmp_path / "run", ["--data", str(manifest), *TRAIN_ARGS, "--strict",
                                                "--out", str(tmp_path / "run")])
    stderr = proc.communicate()[1]
    assert proc.returncode == 2
    assert "unreadable" in stderr and "--strict" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"arch": "a", "classes": ["x"], "preprocess": {}, "model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file kept"):
        save_checkpoint(path, {"arch": "a", "classes": ["x"], "preprocess": {}, "model": {"w": torch.zeros(2)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "covidxr-checkpoint", "model": _Exploit(marker)}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(evil)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", np.arange(10).tobytes()])
def test_garbage_checkpoints_give_one_line_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_plain_state_dict_is_not_mistaken_for_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="--weights"):
        load_checkpoint(tmp_path / "sd.pt")
