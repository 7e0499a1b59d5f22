"""What every diagnostic looks at: a task's frozen head and a bounded sample of its inputs.

The diagnostics (disentanglement error, task-feature specialization) probe a backbone on a
few examples per task. They take a :class:`TaskProbe` rather than a whole experiment, so
the Python API works on any backbone + heads + task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from orthoreg.evaluation.accuracy import dataset_tensors


@dataclass(frozen=True)
class TaskProbe:
    """One task as a diagnostic sees it: its name, frozen head and (inputs, labels) data."""

    name: str
    head: nn.Module
    data: Dataset | tuple[Tensor, Tensor]

    def sample(self, max_examples: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(inputs, labels), at most ``max_examples`` of them (see :func:`subsample`)."""
        return subsample(self.data, max_examples, seed)


def subsample(data: Dataset | tuple[Tensor, Tensor], max_examples: int | None,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random subset of at most ``max_examples`` examples, in dataset order.

    Random rather than the first N, because splits may be sorted by class and the first N
    would then cover only a few classes; seeded so that two diagnoses see the same inputs.
    """
    inputs, labels = dataset_tensors(data)
    if max_examples is None or max_examples >= len(labels):
        return inputs, labels
    if max_examples < 1:
        raise ValueError(f"max_examples must be ≥ 1, got {max_examples}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=generator)[:max_examples].sort().values
    return inputs[index.to(inputs.device)], labels[index]
