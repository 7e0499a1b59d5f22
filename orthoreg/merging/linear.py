"""Task arithmetic: the merged task vector is the (weighted) sum of the task vectors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from orthoreg.merging.base import compute_dtype, merge_per_tensor
from orthoreg.merging.registry import optional, real_sequence, register
from orthoreg.taskvector import TaskVector


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_t w_t·τ_t accumulated in place into one fresh tensor (w_t = 1 when not given).

    Half-precision inputs are accumulated in float32 so the sum of many small updates is
    not rounded away; the inputs are never modified.
    """
    dtype = compute_dtype(tensors[0])
    scale = 1.0 if weights is None else float(weights[0])
    total = tensors[0].to(dtype=dtype, copy=True)
    if scale != 1.0:
        total.mul_(scale)
    for index, tensor in enumerate(tensors[1:], start=1):
        total.add_(tensor.to(dtype), alpha=1.0 if weights is None else float(weights[index]))
    return total


@register(
    "task_arithmetic",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR)",
    constraints={"weights": optional(real_sequence())},
)
def task_arithmetic(
    task_vectors: Sequence[TaskVector], *, weights: Sequence[float] | None = None
) -> TaskVector:
    """τ_merged = Σ_t w_t·τ_t (Ilharco et al. 2023, task addition: θ = θ0 + α·Σ_t τ_t).

    Defaults: ``weights=None`` (every w_t = 1, the paper's plain sum; the single scale α is
    searched by the caller). Per-vector ``weights`` give the weighted variant, one number
    per task vector.
    """
    if weights is not None and len(weights) != len(task_vectors):
        raise ValueError(
            f"merge method 'task_arithmetic': parameter 'weights' has {len(weights)} "
            f"entries for {len(task_vectors)} task vectors"
        )
    return merge_per_tensor(task_vectors, lambda _, tensors: weighted_sum(tensors, weights))
