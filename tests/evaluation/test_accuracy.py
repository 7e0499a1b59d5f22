"""Accuracy of head(backbone(x)) on tensor datasets: known answers and loud failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.evaluation import EmptyDatasetError, accuracy, predict


def _identity_model() -> tuple[nn.Module, nn.Module]:
    backbone = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(3))
    return backbone, nn.Identity()


def test_accuracy_known_answer_and_batching() -> None:
    backbone, head = _identity_model()
    x = torch.eye(3).repeat(4, 1)  # argmax of row i is i % 3
    labels = torch.tensor([0, 1, 2] * 3 + [2, 2, 2])  # the last three rows: one of 3 right
    data = TensorDataset(x, labels)
    assert predict(backbone, head, data, batch_size=5).tolist() == [0, 1, 2] * 4
    for batch_size in (1, 5, 256):
        assert accuracy(backbone, head, data, batch_size=batch_size) == pytest.approx(10 / 12)


def test_eval_mode_used_and_training_flags_restored() -> None:
    backbone = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p=0.9))
    head = nn.Linear(4, 3)
    backbone.train()
    head.train()
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    first = predict(backbone, head, data)
    assert torch.equal(first, predict(backbone, head, data))  # dropout off: deterministic
    assert backbone.training and backbone[1].training and head.training


def test_head_with_too_few_classes_is_refused() -> None:
    backbone, head = _identity_model()
    data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="3 classes but the labels go up to 5"):
        accuracy(backbone, head, data)


def test_empty_dataset_is_refused() -> None:
    backbone, head = _identity_model()
    empty = TensorDataset(torch.empty(0, 3), torch.empty(0, dtype=torch.int64))
    with pytest.raises(EmptyDatasetError, match="empty"):
        accuracy(backbone, head, empty)


def test_float_labels_are_refused() -> None:
    backbone, head = _identity_model()
    with pytest.raises(TypeError, match="integers"):
        accuracy(backbone, head, TensorDataset(torch.eye(3), torch.tensor([0.0, 1.0, 2.0])))
