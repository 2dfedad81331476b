"""The source adversary (--adversary): its losses reach the right parameters, its prior, and a real training run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from covidxr.errors import DatasetError
from covidxr.model.checkpoint import load_checkpoint
from covidxr.networks.architectures import XrayClassifier
from covidxr.training.__main__ import main
from covidxr.training.adversary import (
    AdversarialNetwork,
    SourceAdversary,
    build_adversarial,
    source_indices,
    source_prior,
)


def _toy(weight: float = 1.0) -> tuple[AdversarialNetwork, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = XrayClassifier("toy", nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, 2, (0, 0, 0), (1, 1, 1))
    targets = torch.tensor([0, 0, 1, 1, 0, 1])
    sources = torch.tensor([0, 1, 1, 2, 0, 2])
    adversary = SourceAdversary(6, source_prior(targets, sources, 2, 3), hidden=5)
    return AdversarialNetwork(model, adversary, weight), torch.randn(6, 1, 2, 2), targets, sources


def test_source_prior_is_each_class_source_frequencies() -> None:
    prior = source_prior(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1]), 3, 2)
    torch.testing.assert_close(prior, torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0], [0.5, 0.5]]))


def test_adversary_loss_trains_the_adversary_only_and_confusion_the_backbone_only() -> None:
    net, images, targets, sources = _toy()
    features = net.model.features(images)
    adversary_loss, confusion = net.adversary(features, targets, sources)
    adversary_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in net.model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.adversary.parameters())
    net.zero_grad(set_to_none=True)
    confusion.backward()
    assert all(p.grad is None for p in net.adversary.parameters())
    assert net.model.backbone[1].weight.grad.abs().sum() > 0


def test_confusion_is_cross_entropy_against_the_class_source_frequencies() -> None:
    net, images, targets, sources = _toy()
    features = net.model.features(images)
    _, confusion = net.adversary(features, targets, sources)
    log_p = net.adversary.logits(features, targets).log_softmax(1)
    expected = -(net.adversary.prior[targets] * log_p).sum(1).mean()
    torch.testing.assert_close(confusion, expected)
    logits, total = net(images, targets, sources)
    adversary_loss = nn.functional.cross_entropy(net.adversary.logits(features, targets), sources)
    torch.testing.assert_close(total, adversary_loss + net.weight * confusion)
    assert logits.shape == (6, 2)


def test_a_backbone_step_on_the_confusion_loss_brings_the_adversary_towards_the_prior() -> None:
    net, images, targets, sources = _toy()
    optimizer = torch.optim.SGD(net.model.backbone.parameters(), lr=0.5)

    def confusion() -> torch.Tensor:
        return net.adversary(net.model.features(images), targets, sources)[1]

    before = confusion().item()
    for _ in range(5):
        optimizer.zero_grad()
        confusion().backward()
        optimizer.step()
    assert confusion().item() < before


def test_source_indices_need_two_sources() -> None:
    names, index = source_indices(pd.DataFrame({"source": ["b", "a", "b"], "label": ["x", "y", "x"]}))
    assert names == ["a", "b"] and index.tolist() == [1, 0, 1]
    with pytest.raises(DatasetError, match="at least two sources"):
        source_indices(pd.DataFrame({"source": ["a", "a"]}))
    with pytest.raises(DatasetError, match="no source column"):
        source_indices(pd.DataFrame({"label": ["x"]}))


def test_build_adversarial_sizes_the_adversary_from_the_training_rows() -> None:
    model = XrayClassifier("toy", nn.Sequential(nn.Flatten(), nn.Linear(3, 4)), 4, 2, (0, 0, 0), (1, 1, 1))
    train = pd.DataFrame({"source": ["h1", "h2", "h2", "h3"], "label": ["covid", "covid", "normal", "normal"]})
    net, sources = build_adversarial(model, train, ["covid", "normal"], 0.5)
    assert sources.tolist() == [0, 1, 1, 2] and net.weight == 0.5
    torch.testing.assert_close(net.adversary.prior, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))


def _train_args(manifest: Path, out: Path, epochs: int = 2, freeze: int = 1) -> list[str]:
    return ["--data", str(manifest), "--arch", "resnet18", "--weights", "none", "--img-size", "32", "--epochs",
            str(epochs), "--batch-size", "8", "--workers", "0", "--freeze-epochs", str(freeze), "--patience", "0",
            "--no-gate", "--adversary", "0.5", "--out", str(out)]


def test_training_with_an_adversary_keeps_it_out_of_the_model(small_manifest: Path, tmp_path: Path) -> None:
    assert main(_train_args(small_manifest, tmp_path / "run")) == 0
    last, best = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "run" / "best.pt")
    assert last["config"]["adversary"] == 0.5 and "adversary" not in best
    n_sources = pd.read_csv(tmp_path / "run" / "split.csv").query("split == 'train'")["source"].nunique()
    assert last["adversary"]["out.weight"].shape[0] == n_sources >= 2
    assert len(last["optimizer"]["param_groups"]) == 4  # head, backbone (decay, no decay), adversary


def test_an_adversary_without_two_sources_is_a_one_line_error(small_manifest: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    table = pd.read_csv(small_manifest).assign(source="one hospital")
    table.to_csv(tmp_path / "one.csv", index=False)
    assert main(_train_args(tmp_path / "one.csv", tmp_path / "run", epochs=1)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("covidxr.train: error: --adversary needs at least two sources")


@pytest.mark.slow  # three training runs
def test_resume_with_an_adversary_matches_an_uninterrupted_run(small_manifest: Path, tmp_path: Path) -> None:
    # No frozen epoch, so the adversary trains in epoch 1 and its state must carry over; epoch 1 is all warm-up,
    # so a 1-epoch run has the same learning rates as the first epoch of a 2-epoch one.
    assert main(_train_args(small_manifest, tmp_path / "full", 2, freeze=0)) == 0
    assert main(_train_args(small_manifest, tmp_path / "part", 1, freeze=0)) == 0
    assert main(["--resume", str(tmp_path / "part" / "last.pt"), "--epochs", "2"]) == 0
    full, part = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for key, value in full["model"].items():
        torch.testing.assert_close(part["model"][key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in full["adversary"].items():
        torch.testing.assert_close(part["adversary"][key], value, rtol=0, atol=1e-6, msg=key)
