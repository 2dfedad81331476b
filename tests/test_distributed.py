"""``torchrun --nproc_per_node=2 -m covidxr.train`` on the CPU (Gloo), and the rank-aware pieces it uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from covidxr.data.loaders import DistributedWeightedSampler, load_run_data, make_loaders
from covidxr.model.checkpoint import load_checkpoint
from covidxr.networks.architectures import build_model
from covidxr.networks.batches import EpochOutput, predict_loader
from covidxr.training import engine
from covidxr.training.config import TrainConfig
from covidxr.training.distributed import DistInfo, env_info, gather_epoch

REPO = Path(__file__).resolve().parents[1]


def _tiny_manifest(shared: Path, out: Path, per_class: int) -> Path:
    """The first ``per_class`` patients of each class of the shared data, as a CSV manifest."""
    meta = pd.read_csv(shared / "metadata.csv", dtype=str, keep_default_na=False)
    keep = meta.groupby("label")["patient_id"].transform(lambda p: p.isin(p.drop_duplicates().iloc[:per_class]))
    subset = meta[keep].assign(path=lambda t: [str(shared / p) for p in t["path"]])
    subset.to_csv(out, index=False)
    return out


def test_environment_of_torchrun_is_read() -> None:
    assert env_info({}) == DistInfo() and not DistInfo().enabled and DistInfo().is_main
    info = env_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (3, 4, 1, True, False)
    out = EpochOutput(1.0, torch.zeros(2, 3).numpy(), torch.zeros(2).long().numpy(), torch.arange(2).numpy())
    assert gather_epoch(out, DistInfo(), dedupe=True) is out  # a single process gathers nothing


def test_weighted_sampling_over_ranks_is_the_single_process_draw_shared_out() -> None:
    weights = [0.1, 0.1, 0.4, 0.4, 1.0, 1.0, 1.0]
    single = list(WeightedRandomSampler(weights, 7, replacement=True, generator=torch.Generator().manual_seed(5)))
    shards = [list(DistributedWeightedSampler(weights, 7, rank, 2, seed=5)) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    assert shards[0] == single[0:6:2] and shards[1] == single[1:6:2]
    assert list(DistributedWeightedSampler(weights, 7, 0, 2, seed=6)) != shards[0]  # the epoch's seed matters


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    found = shutil.which("torchrun")
    launcher = [found] if found else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [*launcher, "--standalone", "--nproc_per_node=2", "-m", "covidxr.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_and_report_metrics_over_all_ranks(shared_data: Path,
                                                                               tmp_path: Path) -> None:
    manifest = _tiny_manifest(shared_data, tmp_path / "m.csv", per_class=5)
    first = _torchrun(["--data", str(manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "48",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--freeze-epochs", "1",
                       "--patience", "0", "--balance", "sampler"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on rank 0's folder; only rank 0 created it
    run = runs[0]
    assert first.stderr.count("epoch   1 [head]") == 1  # only rank 0 reports

    second = _torchrun(["--resume", str(run / "last.pt"), "--epochs", "2"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("epoch   2 [full]") == 1
    # best.gate.pt: the input gate training fits, a sidecar pinned to best.pt's hash (best.pt never changes after)
    assert sorted(p.name for p in run.iterdir()) == ["best.gate.pt", "best.pt", "config.json", "history.csv",
                                                     "last.pt", "split.csv"]
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2] and list(history["phase"]) == ["head", "full"]

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    model = build_model("resnet18", len(ckpt["classes"]), "none")
    model.load_state_dict(ckpt["model"])
    # The logged validation metrics are those of the saved model over every validation image once.
    settings = TrainConfig.from_dict(ckpt["config"]).loader_settings()
    data = load_run_data(settings, run / "split.csv")
    out = predict_loader(model, make_loaders(data, settings, torch.device("cpu"), 0)["val"], torch.device("cpu"),
                         nullcontext, progress=False)
    expected = engine.summary_metrics(out.logits, out.targets, len(ckpt["classes"]))
    assert len(out.targets) == (data.table["split"] == "val").sum() == 5  # odd: one rank saw a padding repeat
    assert history["val_acc"].iloc[-1] == pytest.approx(expected["acc"], abs=1e-9)
    assert history["val_f1"].iloc[-1] == pytest.approx(expected["f1"], abs=1e-6)
