"""What every merge method shares: the compatibility check, provenance, the per-tensor loop.

Merging is done one tensor name at a time so that peak memory is one tensor × the number
of tasks, never a second copy of every vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from orthoreg.taskvector import _IDENTITY_KEYS, TaskVector, check_all_compatible

#: (tensor name, the T task tensors for that name) -> the merged tensor
TensorMerge = Callable[[str, Sequence[Tensor]], Tensor]


def check_mergeable(task_vectors: Iterable[TaskVector]) -> list[TaskVector]:
    """Return the vectors as a list, or raise before any work if they cannot be merged.

    Keys, shapes and dtypes are compared through ``TaskVector.check_compatible`` against
    the first vector. The identity keys (base model fingerprint, paradigm) are compared
    across *all* vectors as well: ``check_compatible`` lets a vector without a fingerprint
    pass, so comparing only against the first would accept [no-fingerprint, A, B].
    """
    vectors = list(task_vectors)
    if not vectors:
        raise ValueError("merging needs at least one task vector")
    for index, vector in enumerate(vectors):
        if not isinstance(vector, TaskVector):
            raise TypeError(f"item {index} is a {type(vector).__name__}, not a TaskVector")
    check_all_compatible(vectors)
    return vectors


def merged_metadata(task_vectors: Sequence[TaskVector]) -> dict[str, Any]:
    """Provenance of a merge: the shared identity keys and the list of merged tasks.

    Per-task fields (λ, seed, training record) describe one input, not the merge, and are
    dropped; the registry adds the merge method and its hyper-parameters.
    """
    metadata: dict[str, Any] = {}
    for key in _IDENTITY_KEYS:
        for vector in task_vectors:
            if vector.metadata.get(key) is not None:
                metadata[key] = vector.metadata[key]
                break
    tasks: list[Any] = []
    for vector in task_vectors:
        task = vector.metadata.get("task")
        if task is not None:
            tasks.extend(task if isinstance(task, list | tuple) else [task])
    if tasks:
        metadata["task"] = tasks
    return metadata


def merge_per_tensor(task_vectors: Sequence[TaskVector], merge_tensor: TensorMerge) -> TaskVector:
    """Apply ``merge_tensor`` name by name; the result keeps the inputs' dtype and provenance.

    The inputs are assumed checked (the registry does it before calling a method).
    """
    merged = {}
    for name, first in task_vectors[0].items():
        tensors = [first, *(vector[name] for vector in task_vectors[1:])]
        merged[name] = merge_tensor(name, tensors).to(first.dtype)
    return TaskVector(merged, merged_metadata(task_vectors))


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half precision (sums and SVDs in 16 bits lose the small updates), else as is.

    float32 and float64 inputs are not converted, so they are not copied.
    """
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
