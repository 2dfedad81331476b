"""One reader of a trained run (covidxr.data.run_folder.RunFolder): its split, training data and loader settings,
the same for evaluate, the gate's fit and explain score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from covidxr.data.loaders import input_pipeline
from covidxr.data.manifest import load_manifest
from covidxr.data.run_folder import RunFolder
from covidxr.errors import DatasetError
from covidxr.evaluation.inputs import EvalOptions, eval_settings
from covidxr.explain import scoring
from covidxr.inference import gate_fit
from covidxr.training.config import TrainConfig


def test_split_beside_the_checkpoint_first_then_the_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    run = RunFolder.read(tiny_run / "best.pt")
    beside, origin = run.split()
    assert origin == str(tiny_run / "split.csv") and beside.equals(run.require_split())
    moved = tmp_path / "best.pt"
    shutil.copy(tiny_run / "best.pt", moved)  # a checkpoint copied away from its run folder
    recorded, origin = RunFolder.read(moved).split()
    assert origin == "checkpoint"
    key = ["relpath", "split"]
    assert recorded[key].sort_values(key).reset_index(drop=True).equals(
        beside[key].astype(str).sort_values(key).reset_index(drop=True))
    bare = RunFolder(moved, {k: v for k, v in run.ckpt.items() if k != "split"})
    assert bare.split() == (None, None)
    with pytest.raises(DatasetError, match="the run recorded no split"):
        bare.require_split()


def test_default_data_and_loader_settings_are_the_runs(tiny_run: Path, small_manifest: Path, tmp_path: Path) -> None:
    run = RunFolder.read(tiny_run / "best.pt")
    assert run.data_path() == small_manifest.resolve() and run.data_path(tmp_path) == tmp_path.resolve()
    settings = run.loader_settings(batch_size=3)
    assert (settings.data, settings.img_size, settings.batch_size) == (str(small_manifest), 64, 3)
    trained = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    assert settings.preprocessing == trained.preprocessing and settings.seed == trained.seed
    # evaluation reads the given data with the run's preprocessing and split, at its own batch size and workers
    opts = EvalOptions(checkpoint=tiny_run / "best.pt", batch_size=5, workers=0)
    evaluated = eval_settings(run, opts, tmp_path)
    assert (evaluated.data, evaluated.batch_size, evaluated.workers) == (str(tmp_path), 5, 0)
    assert evaluated.preprocessing == trained.preprocessing and evaluated.img_size == run.preprocess.img_size
    assert input_pipeline(evaluated) == run.pipeline()
    assert (evaluated.val_frac, evaluated.test_frac, evaluated.seed) == (trained.val_frac, trained.test_frac,
                                                                         trained.seed)


def test_the_gate_fit_and_explain_read_runs_through_it(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[Path] = []
    real_read, real_of = RunFolder.read.__func__, RunFolder.of.__func__

    def recording(cls: type[RunFolder], checkpoint: Path) -> RunFolder:
        read.append(Path(checkpoint))
        return real_read(cls, checkpoint)

    def recording_of(cls: type[RunFolder], trained: object) -> RunFolder:
        read.append(Path(trained.path))  # the gate fit reads the run of the model it has loaded
        return real_of(cls, trained)

    monkeypatch.setattr(RunFolder, "read", classmethod(recording))
    monkeypatch.setattr(RunFolder, "of", classmethod(recording_of))

    def stop(*args: object, **kwargs: object) -> None:
        raise DatasetError("stop here")

    monkeypatch.setattr(scoring, "select_images", stop)
    monkeypatch.setattr(gate_fit, "load_run_data", stop)
    checkpoint = tiny_run / "best.pt"
    with pytest.raises(DatasetError, match="stop here"):
        scoring.score(checkpoint, None, "test", ["gradcam"], 2, tiny_run / "scores", device="cpu")
    with pytest.raises(DatasetError, match="stop here"):
        gate_fit.fit_checkpoint(checkpoint, device="cpu")
    assert read == [checkpoint, checkpoint]


def test_explain_defaults_to_the_data_evaluate_reads(tiny_run: Path, small_manifest: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDXR_DATA", str(tiny_run))  # another dataset that the old default would have read
    seen: list[pd.DataFrame] = []

    def capture(table: pd.DataFrame, *args: object) -> pd.DataFrame:
        seen.append(table)
        raise DatasetError("stop here")

    monkeypatch.setattr(scoring, "select_images", capture)
    with pytest.raises(DatasetError):
        scoring.score(tiny_run / "best.pt", None, "test", ["gradcam"], 2, tiny_run / "scores", device="cpu")
    assert seen[0]["path"].tolist() == load_manifest(small_manifest)["path"].tolist()
