"""Manifests, folder scans and the patient-grouped split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.data.loaders import exclude_rows, sample_weights
from covidxr.data.manifest import load_manifest, resolve_data_path, validate_for_training
from covidxr.data.split import _majority_labels, assign_splits, leakage_groups, make_split
from covidxr.errors import DatasetError


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_kaggle_layout_is_found_recursively_and_masks_are_skipped(tmp_path: Path) -> None:
    for cls in ("COVID", "Normal"):
        for i in range(2):
            _png(tmp_path / cls / "images" / f"{cls}-{i}.png", i)
            _png(tmp_path / cls / "masks" / f"{cls}-{i}.png", i)
    table = load_manifest(tmp_path)
    assert sorted(table["label"].unique()) == ["COVID", "Normal"]
    assert len(table) == 4 and not table["relpath"].str.contains("masks").any()
    assert table["patient_id"].str.startswith("image:").all()  # no patient ids: each image its own group


def test_csv_manifest_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "m.csv").write_text("path,label,patient_id\nimgs/a.png,covid,p1\n")
    table = load_manifest(tmp_path / "m.csv")
    assert table.loc[0, "path"] == str(tmp_path / "imgs" / "a.png") and table.loc[0, "patient_id"] == "p1"


def test_shared_folder_is_read_through_its_metadata(shared_data: Path) -> None:
    table = load_manifest(shared_data)
    assert len(table) == 402 and table["patient_id"].nunique() == 366
    assert set(table["label"]) == {"covid", "normal", "pneumonia"}


def test_data_location_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDXR_DATA", str(tmp_path))
    assert resolve_data_path(None) == tmp_path.resolve()
    assert resolve_data_path(str(tmp_path / ".")) == tmp_path.resolve()
    monkeypatch.setenv("COVIDXR_DATA", str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="data/README.md"):
        resolve_data_path(None)


def test_unusable_datasets_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images"):
        validate_for_training(pd.DataFrame(columns=["path", "label"]), "x")
    one = pd.DataFrame({"path": [str(tmp_path)], "label": ["covid"]})
    with pytest.raises(DatasetError, match="only one class"):
        validate_for_training(one, "x")
    ghost = pd.DataFrame({"path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "label": ["a", "b"]})
    with pytest.raises(DatasetError, match="do not exist"):
        validate_for_training(ghost, "x")


def test_identical_files_and_shared_patients_form_one_group() -> None:
    groups = leakage_groups(["p1", "p2", "p3", "p1"], ["h1", "h2", "h2", "h4"])
    assert groups[0] == groups[3] and groups[1] == groups[2] and groups[0] != groups[1]


def test_split_on_real_data_never_leaks_patients_and_is_stratified(shared_data: Path) -> None:
    table = make_split(load_manifest(shared_data), seed=3)
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    shares = table.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert shares["test"].between(0.10, 0.20).all() and shares["val"].between(0.10, 0.20).all()
    assert not table.equals(make_split(load_manifest(shared_data), seed=4))


def test_byte_identical_copies_under_different_patients_stay_together(tmp_path: Path) -> None:
    rows = []
    for i in range(40):
        _png(tmp_path / f"{i}.png", i)
        rows.append({"path": str(tmp_path / f"{i}.png"), "relpath": f"{i}.png", "label": "ab"[i % 2],
                     "patient_id": f"p{i}", "source": "", "view": ""})
    _png(tmp_path / "copy.png", 5)  # same bytes as 5.png, another patient id
    rows.append({"path": str(tmp_path / "copy.png"), "relpath": "copy.png", "label": "b", "patient_id": "other",
                 "source": "", "view": ""})
    for seed in range(5):
        table = make_split(pd.DataFrame(rows), seed=seed)
        assert table.loc[5, "split"] == table.loc[40, "split"]


def test_split_assignment_matches_the_group_by_group_rule() -> None:
    """Groups with mixed labels take their most frequent one (value_counts order on ties), as group by group did."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, 300)
    labels = np.where(rng.random(300) < 0.3, "b", np.array(["a", "b", "c"])[groups % 3])
    frame = pd.DataFrame({"label": labels, "group": groups})
    expected = frame.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    assert _majority_labels(frame).equals(expected)
    out = assign_splits(labels.tolist(), groups, seed=1, forced_test=[7])
    assert pd.DataFrame({"g": groups, "s": out}).groupby("g")["s"].nunique().max() == 1
    assert set(out[groups == 7]) == {"test"} and set(out) == {"train", "val", "test"}


def test_holdout_source_goes_entirely_to_test() -> None:
    labels = ["a", "b"] * 20
    out = assign_splits(labels, list(range(40)), seed=0, forced_test=[0, 1, 2])
    assert list(out[:3]) == ["test"] * 3 and set(out) == {"train", "val", "test"}


def test_group_balancing_gives_each_class_source_pair_equal_weight() -> None:
    table = pd.DataFrame({"label": ["a", "a", "a", "b"], "source": ["x", "x", "y", "y"]})
    weights = sample_weights(table, "group")
    assert weights.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert sample_weights(table, "sampler").tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_exclusions_drop_sources_and_metadata_values() -> None:
    table = pd.DataFrame({"label": ["a", "b", "c"], "source": ["x", "y", "y"], "view": ["PA", "L", "AP"]})
    assert exclude_rows(table, ["x"], ["view=L"])["label"].tolist() == ["c"]
    with pytest.raises(DatasetError, match="COLUMN=VALUE"):
        exclude_rows(table, [], ["nocolumn=1"])
