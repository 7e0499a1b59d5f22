"""The addition protocol searches each merge method's reference α grid unless told otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg import merging
from orthoreg.evaluation import DEFAULT_ALPHAS, TaskEval, addition
from orthoreg.taskvector import TaskVector
from orthoreg.utils.provenance import fingerprint_state


def _setup() -> tuple[nn.Module, dict[str, TaskEval], dict[str, TaskVector], dict]:
    backbone = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(3))
    head = nn.Linear(3, 2, bias=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    meta = {"paradigm": "full", "base_fingerprint": fingerprint_state(backbone.state_dict())}
    vectors = {name: TaskVector({"weight": 0.1 * torch.randn(3, 3, generator=generator)},
                                {**meta, "task": name}) for name in ("A", "B")}
    tasks = {name: TaskEval(name, head, data, data) for name in vectors}
    finetuned = {name: {"val": 1.0, "test": 1.0} for name in vectors}
    return backbone, tasks, vectors, finetuned


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "iso_c"])
def test_addition_defaults_to_the_methods_grid(method: str) -> None:
    backbone, tasks, vectors, finetuned = _setup()
    result = addition(backbone, tasks, vectors, finetuned, merge=method)
    assert result.val_curve["alphas"] == merging.default_alphas(method)
    if method == "task_arithmetic":
        assert result.val_curve["alphas"] == list(DEFAULT_ALPHAS)  # DESIGN.md §2, unchanged
    else:
        assert result.val_curve["alphas"][0] == 0.1 and result.val_curve["alphas"][-1] == 3.0


def test_explicit_alphas_win_over_the_methods_grid() -> None:
    backbone, tasks, vectors, finetuned = _setup()
    result = addition(backbone, tasks, vectors, finetuned, alphas=[0.0, 0.7], merge="tsv")
    assert result.val_curve["alphas"] == [0.0, 0.7]
