"""Cross-validation by source on the real shared data at tiny settings: every fold's split keeps the held-out source
out of training, and crossval.json/csv/md describe each held-out source."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from covidxr.crossval.__main__ import main
from covidxr.evaluation.heldout import ONE_CLASS


def all_csv_subset(shared_data: Path, out: Path, per_group: int = 4) -> Path:
    """``per_group`` images of every (source, class) of all.csv, with absolute paths."""
    root = shared_data.parent
    table = pd.read_csv(root / "all.csv", dtype=str, keep_default_na=False)
    subset = table.groupby(["source", "label"]).head(per_group).copy()
    subset["path"] = [str(root / p) for p in subset["path"]]
    subset.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def crossval_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    base = tmp_path_factory.mktemp("crossval")
    manifest = all_csv_subset(shared_data, base / "manifest.csv")
    out = base / "cv"
    assert main(["--by", "source", "--data", str(manifest), "--arch", "resnet18", "--weights", "none",
                 "--img-size", "32", "--min-images", "4", "--epochs", "1", "--batch-size", "8", "--bootstrap", "20",
                 "--workers", "0", "--out", str(out)]) == 0
    return {"manifest": pd.read_csv(manifest, dtype=str, keep_default_na=False), "out": out,
            "content": json.loads((out / "crossval.json").read_text())}


@pytest.mark.slow
def test_no_image_of_the_held_out_source_is_ever_trained_on(crossval_run: dict) -> None:
    content, out, manifest = crossval_run["content"], crossval_run["out"], crossval_run["manifest"]
    assert {f["name"] for f in content["folds"]} == set(manifest["source"])  # every source has 4+ images
    for fold in content["folds"]:
        held_out = fold["name"]
        split = pd.read_csv(out / fold["split_csv"], dtype=str, keep_default_na=False)
        assert list(split.columns[:2]) == ["relpath", "split"]
        assert len(split) == split["relpath"].nunique() == len(manifest)
        of_source = split["source"] == held_out
        assert (split.loc[of_source, "split"] == "test").all()
        assert set(split.loc[~of_source, "split"]) <= {"train", "val"}
        trained = split.loc[split["split"].isin(["train", "val"]), "patient_id"]
        assert not set(trained) & set(split.loc[of_source, "patient_id"])
        run_split = pd.read_csv(out / fold["run"] / "split.csv", dtype=str, keep_default_na=False)
        assert run_split.set_index("relpath")["split"].to_dict() == split.set_index("relpath")["split"].to_dict()
        assert fold["n_images"] == int(of_source.sum()) and fold["ci"]["n_resamples"] == 20


@pytest.mark.slow
def test_outputs_report_each_held_out_source(crossval_run: dict) -> None:
    content, out = crossval_run["content"], crossval_run["out"]
    hannover = next(f for f in content["folds"] if f["name"].startswith("Hannover"))
    assert hannover["metrics"]["roc_auc_macro"] is None  # a single class (covid)
    assert hannover["baselines"]["source"]["seen_share"] == 0.0  # the held-out source is never seen in training
    table = pd.read_csv(out / "crossval.csv", keep_default_na=False)
    assert len(table) == len(content["folds"]) and {"balanced_accuracy_lo", "recall_covid_hi"} <= set(table.columns)
    assert table.loc[table["name"] == hannover["name"], "roc_auc_macro"].item() == ONE_CLASS
    md = (out / "crossval.md").read_text()
    assert md.count("\n| ") == len(content["folds"]) + 1 and "cannot know the held-out source" in md


def test_one_source_is_refused_in_one_line(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = pd.read_csv(all_csv_subset(shared_data, tmp_path / "m.csv"), dtype=str, keep_default_na=False)
    table[table["source"] == table["source"].iloc[0]].to_csv(tmp_path / "one.csv", index=False)
    assert main(["--by", "source", "--data", str(tmp_path / "one.csv"), "--min-images", "1", "--weights", "none",
                 "--out", str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("covidxr.crossval: error: ") and "two sources" in err[-1]
