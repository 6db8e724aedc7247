"""Tests of dopq.evaluate: exact top-1/top-5 on a fake model with known logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dopq.errors import DataError
from dopq.evaluate import EvalResult, accuracy_counts, evaluate

NUM_CLASSES = 7
# rank of the true label among each sample's logits (0 = highest): top-1 hits 2 of 6, top-5 hits 4 of 6
RANKS = [0, 1, 4, 5, 6, 0]


def _table(ranks: list[int], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with distinct values and labels placed at the given ranks."""
    g = torch.Generator().manual_seed(0)
    logits, labels = [], []
    for rank in ranks:
        order = torch.randperm(num_classes, generator=g)  # order[j] gets the j-th highest logit
        row = torch.empty(num_classes)
        row[order] = torch.arange(num_classes, 0, -1, dtype=torch.float32)
        logits.append(row)
        labels.append(int(order[rank]))
    return torch.stack(logits), torch.tensor(labels)


class _LookupModel(nn.Module):
    """Returns the stored logits of the sample whose index is the input's first value."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.inference_mode_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inference_mode_seen.append(torch.is_inference_mode_enabled() and not self.training)
        return self.table[x[:, 0].long()]


def _loader(ranks: list[int], num_classes: int, batch_size: int = 4) -> tuple[_LookupModel, DataLoader]:
    logits, labels = _table(ranks, num_classes)
    inputs = torch.arange(len(ranks), dtype=torch.float32).view(-1, 1)
    return _LookupModel(logits), DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)


def test_evaluate_exact_accuracies() -> None:
    model, loader = _loader(RANKS, NUM_CLASSES)
    model.train()
    result = evaluate(model, loader, progress=False)
    assert (result.top1, result.top5, result.images) == (2 / 6, 4 / 6, 6)
    assert result.top1_correct == "100001"  # per image, in loader order, across both batches
    assert result.seconds > 0 and result.images_per_second == pytest.approx(6 / result.seconds)
    assert model.inference_mode_seen == [True, True]  # two batches, eval mode, inference mode


def test_top5_is_capped_by_num_classes() -> None:
    model, loader = _loader([0, 1, 2, 2], num_classes=3)
    result = evaluate(model, loader, progress=True, desc="tiny")
    assert (result.top1, result.top5) == (0.25, 1.0)


def test_accuracy_counts() -> None:
    logits, labels = _table(RANKS, NUM_CLASSES)
    assert accuracy_counts(logits, labels, ks=(1, 2, 5, 6, 7, 10)) == (2, 3, 4, 5, 6, 6)
    with pytest.raises(ValueError, match="expected logits"):
        accuracy_counts(logits, labels[:3])


def test_eval_result_dict() -> None:
    result = EvalResult(top1=0.5, top5=0.75, images=100, seconds=4.0)
    expected = {"top1": 0.5, "top5": 0.75, "images": 100, "seconds": 4.0, "top1_correct": "",
                "images_per_second": 25.0}  # fmt: skip
    assert result.to_dict() == expected
    assert EvalResult(0.0, 0.0, 0, 0.0).images_per_second == 0.0


def test_empty_loader_raises() -> None:
    model, _ = _loader(RANKS, NUM_CLASSES)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="no images"):
        evaluate(model, empty, progress=False)
