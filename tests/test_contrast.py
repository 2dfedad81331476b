"""The source-contrast objective (--loss contrast), its sampling (--balance sqrt, --epoch-size) and its epoch score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from covidxr.data.loaders import LoaderSettings, sample_weights, split_sampler
from covidxr.errors import DatasetError
from covidxr.training.__main__ import main
from covidxr.training.contrast import SourceContrastLoss, contrast_mask, within_source_auc

CLASSES = ["covid", "normal", "pneumonia"]


def _table() -> pd.DataFrame:
    # siim: covid and normal; nih: normal and pneumonia; han: covid only; comp: all three.
    rows = ([("covid", "siim")] * 6 + [("normal", "siim")] * 6 + [("normal", "nih")] * 4 + [("pneumonia", "nih")] * 2
            + [("covid", "han")] * 3 + [("covid", "comp"), ("normal", "comp"), ("pneumonia", "comp")])
    return pd.DataFrame(rows, columns=["label", "source"])


def test_each_row_is_compared_with_its_own_sources_classes_only() -> None:
    table = _table()
    mask = contrast_mask(table, CLASSES)
    by_source = {s: {tuple(r) for r in mask[(table["source"] == s).to_numpy()]} for s in table["source"].unique()}
    assert by_source["siim"] == {(True, True, False)}
    assert by_source["nih"] == {(False, True, True)}
    assert by_source["comp"] == {(True, True, True)}
    assert by_source["han"] == {(False, False, False)}  # one class: no contrast to learn


def test_the_loss_is_cross_entropy_among_the_allowed_classes_and_leaves_the_others_alone() -> None:
    table = _table()
    mask = contrast_mask(table, CLASSES)
    loss_fn = SourceContrastLoss(mask)
    torch.manual_seed(0)
    logits = torch.randn(len(table), 3, requires_grad=True)
    targets = torch.tensor([CLASSES.index(c) for c in table["label"]])
    rows = torch.arange(len(table))
    loss = loss_fn(logits, targets, rows)
    loss.backward()
    keep = torch.as_tensor(mask.any(1))
    expected = []
    for i in np.flatnonzero(mask.any(1)):
        allowed = np.flatnonzero(mask[i])
        expected.append(F.cross_entropy(logits[i, allowed][None], torch.tensor([list(allowed).index(targets[i])])))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)
    grad = logits.grad
    assert torch.all(grad[torch.as_tensor(~mask)] == 0)  # a class the source lacks gets no push either way
    assert torch.all(grad[~keep] == 0)
    assert grad[keep].abs().sum() > 0


def test_a_batch_without_any_contrast_gives_a_zero_loss_with_a_gradient_path() -> None:
    table = _table()
    loss_fn = SourceContrastLoss(contrast_mask(table, CLASSES))
    han = np.flatnonzero((table["source"] == "han").to_numpy())
    logits = torch.randn(len(han), 3, requires_grad=True)
    loss = loss_fn(logits, torch.zeros(len(han), dtype=torch.long), han)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_sqrt_balance_weighs_groups_by_the_square_root_of_their_size() -> None:
    table = _table()
    weights = sample_weights(table, "sqrt")
    groups = table["label"] + "/" + table["source"]
    totals = pd.Series(weights).groupby(groups.to_numpy()).sum()
    sizes = groups.value_counts()
    assert np.allclose(totals / np.sqrt(sizes[totals.index]), totals.iloc[0] / np.sqrt(sizes[totals.index[0]]))
    assert totals["covid/siim"] > totals["covid/comp"]  # bigger group, more draws, but not 6 times more
    assert totals["covid/siim"] / totals["covid/comp"] == pytest.approx(np.sqrt(6))


def test_contrast_sampling_never_draws_a_single_class_source() -> None:
    table = _table()
    weights = sample_weights(table, "sqrt", contrast=True)
    assert np.all(weights[(table["source"] == "han").to_numpy()] == 0)
    assert np.all(weights[(table["source"] != "han").to_numpy()] > 0)
    with pytest.raises(DatasetError, match="no training source holds two classes"):
        sample_weights(table[table["source"] == "han"], "sqrt", contrast=True)


def test_epoch_size_draws_that_many_films_with_the_balance_weights() -> None:
    table = _table()
    settings = LoaderSettings(balance="sqrt", loss="contrast", epoch_size=500)
    drawn = list(split_sampler(table, True, settings, epoch=1, epoch_seed=7))
    assert len(drawn) == 500
    assert not set(table.index[table["source"] == "han"]) & set(drawn)
    again = list(split_sampler(table, True, settings, epoch=1, epoch_seed=7))
    assert drawn == again  # seeded by the epoch
    assert len(list(split_sampler(table, False, settings, epoch=1, epoch_seed=7))) == len(table)  # eval: every film


def test_within_source_auc_gives_nothing_for_knowing_the_source() -> None:
    rng = np.random.default_rng(0)
    sources = np.array(["a"] * 40 + ["b"] * 40 + ["c"] * 20)
    targets = np.array([0, 1] * 20 + [1, 2] * 20 + [0] * 20)
    # A model that only recognises the source: a's films look covid, b's pneumonia, c's covid.
    by_source = {"a": [0.8, 0.1, 0.1], "b": [0.1, 0.1, 0.8], "c": [0.8, 0.1, 0.1]}
    shortcut = np.array([by_source[s] for s in sources]) + rng.normal(0, 1e-3, (100, 3))
    assert within_source_auc(shortcut, targets, sources) == pytest.approx(0.5, abs=0.1)
    truth = np.eye(3)[targets] * 0.9 + 0.05
    assert within_source_auc(truth, targets, sources) == pytest.approx(1.0)
    assert np.isnan(within_source_auc(truth[80:], targets[80:], sources[80:]))  # c alone holds one class


@pytest.mark.slow  # a training run
def test_training_with_the_contrast_loss_records_the_within_source_score(small_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--data", str(small_manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "48",
                 "--epochs", "2", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "1", "--no-gate",
                 "--loss", "contrast", "--balance", "sqrt", "--epoch-size", "40", "--out", str(out)]) == 0
    history = pd.read_csv(out / "history.csv")
    assert history["val_auc_within_source"].notna().all()
    config = json.loads((out / "config.json").read_text())
    assert (config["loss"], config["balance"], config["epoch_size"]) == ("contrast", "sqrt", 40)
    best = history.loc[history["val_auc_within_source"].idxmax(), "epoch"]
    assert torch.load(out / "best.pt", weights_only=True)["best_epoch"] == best
