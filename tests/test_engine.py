"""The training loop's bookkeeping, and the dataset's batch fetch that loader processes use."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from covidxr.data.dataset import XrayDataset
from covidxr.preprocessing.transforms import eval_transform, train_transform
from covidxr.training import engine
from covidxr.utils import autocast


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size], torch.arange(i, min(i + size, len(x)))) for i in range(0, len(x), size)]


def test_train_one_epoch_reports_the_sample_weighted_loss_and_every_prediction_in_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put: one expected answer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = engine.train_one_epoch(model, _batches(x, y, 4), nn.CrossEntropyLoss(), optimizer, scheduler, scaler,
                                 torch.device("cpu"), autocast(torch.device("cpu"), None), progress=True)
    with torch.no_grad():
        logits = model(x)
    # Batches of 4, 4 and 2: the epoch loss weighs each batch's mean by its size, i.e. the mean over samples.
    assert abs(out.loss - nn.CrossEntropyLoss()(logits, y).item()) < 1e-6
    np.testing.assert_allclose(out.logits, logits.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out.targets, y.numpy())
    np.testing.assert_array_equal(out.indices, np.arange(10))
    assert scheduler.last_epoch == 3  # one scheduler step per batch


def _dataset(transform) -> XrayDataset:
    squares = np.random.default_rng(0).integers(0, 256, (5, 40, 40), dtype=np.uint8)
    return XrayDataset([f"x{i}.png" for i in range(5)], [0, 1, 2, 1, 0], 40, transform, list(squares))


def test_batch_fetch_equals_item_fetch_for_evaluation() -> None:
    ds = _dataset(eval_transform(32))
    batch = ds.__getitems__([3, 1, 4])
    assert [index for _, _, index in batch] == [3, 1, 4]
    for (image, target, index) in batch:
        expected, expected_target, _ = ds[index]
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
        assert int(target) == int(expected_target)


def test_batch_fetch_augments_each_sample_differently_and_reproducibly() -> None:
    ds = _dataset(train_transform(32))
    torch.manual_seed(5)
    first = torch.stack([image for image, _, _ in ds.__getitems__([2, 2, 2])])
    assert first.shape == (3, 1, 32, 32) and float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert not torch.equal(first[0], first[1])  # the same image, three different draws
    torch.manual_seed(5)
    again = torch.stack([image for image, _, _ in ds.__getitems__([2, 2, 2])])
    assert torch.equal(first, again)
