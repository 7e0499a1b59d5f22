"""Predictions and accuracy of ``head(backbone(x))`` on preprocessed tensor datasets.

Every protocol number in DESIGN.md §2 is an accuracy of this one model shape: a backbone
(the thing fine-tuned and edited) and a frozen per-task head. The inputs are already
preprocessed tensors, so evaluation never touches a DataLoader or a transform: a dataset is
cut into slices once (:class:`EvalBatches`) and the same slices serve every coefficient of
a search.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

#: inputs up to this size are copied to the model's device once and kept there for a whole
#: search; larger ones travel batch by batch (still never re-preprocessed)
DEVICE_CACHE_BYTES = 1 << 30


class EmptyDatasetError(ValueError):
    """A split with no examples: an accuracy over it would be 0/0."""


def dataset_tensors(dataset: Dataset | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(inputs, int64 labels) of a dataset, without copying a TensorDataset.

    Other map-style datasets are stacked once, so that a search over α reads tensors, not
    ``__getitem__`` calls.
    """
    if isinstance(dataset, tuple) and len(dataset) == 2:
        inputs, labels = dataset
    elif getattr(dataset, "tensors", None) is not None:
        if len(dataset.tensors) < 2:
            raise ValueError("a TensorDataset for evaluation needs (inputs, labels) tensors")
        inputs, labels = dataset.tensors[0], dataset.tensors[1]
    else:
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError(f"cannot evaluate on a {type(dataset).__name__} without len()") from exc
        if size == 0:
            raise EmptyDatasetError("cannot evaluate on an empty dataset")
        items = [dataset[i] for i in range(size)]
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([int(y) for _, y in items])
    if len(inputs) == 0:
        raise EmptyDatasetError("cannot evaluate on an empty dataset")
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    return inputs, labels.to(device="cpu", dtype=torch.int64).reshape(-1)


def model_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a stateless module."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class EvalBatches:
    """A dataset cut into fixed slices on the model's device, reused for every α.

    Also owns the label check: the head must produce at least ``max label + 1`` logits,
    otherwise argmax could never be right for some classes and the accuracy would be
    silently capped.
    """

    def __init__(self, dataset: Dataset | tuple[Tensor, Tensor], batch_size: int = 256,
                 device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        inputs, labels = dataset_tensors(dataset)
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be ≥ 0, found {int(labels.min())}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.labels = labels
        self.classes_needed = int(labels.max()) + 1
        nbytes = inputs.numel() * inputs.element_size()
        if inputs.device != self.device and nbytes <= DEVICE_CACHE_BYTES:
            inputs = inputs.to(self.device)
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, len(self.inputs), self.batch_size):
            yield self.inputs[start : start + self.batch_size].to(self.device, non_blocking=True)

    def check_logits(self, logits: Tensor) -> None:
        """Raise if the head has fewer classes than the labels need."""
        if logits.ndim < 2:
            raise ValueError(f"the head must return (batch, classes) logits, got {tuple(logits.shape)}")
        if logits.shape[-1] < self.classes_needed:
            raise ValueError(
                f"the head produces {logits.shape[-1]} classes but the labels go up to "
                f"{self.classes_needed - 1}: wrong head for this dataset?"
            )

    def accuracy(self, predictions: Tensor) -> Tensor:
        """Accuracy of each row of ``predictions`` (shape [..., N]) against the labels."""
        return (predictions.cpu() == self.labels).double().mean(dim=-1)


@contextlib.contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules (and every submodule) in eval mode, and restore each flag afterwards.

    Eval mode matters for BatchNorm and dropout; restoring matters because the caller may be
    in the middle of training the same backbone.
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


def predict(backbone: nn.Module, head: nn.Module, dataset: Dataset | tuple[Tensor, Tensor],
            batch_size: int = 256) -> Tensor:
    """Predicted labels (int64, CPU) of ``head(backbone(x))`` for every example, in order."""
    batches = EvalBatches(dataset, batch_size, model_device(backbone))
    return predict_batches(backbone, head, batches)


def accuracy(backbone: nn.Module, head: nn.Module, dataset: Dataset | tuple[Tensor, Tensor],
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``head(backbone(x))``, in eval mode and without autograd."""
    batches = EvalBatches(dataset, batch_size, model_device(backbone))
    return float(batches.accuracy(predict_batches(backbone, head, batches)))


def predict_batches(backbone: nn.Module, head: nn.Module, batches: EvalBatches) -> Tensor:
    """Predicted labels over prepared batches (the inner loop of every weight-space search)."""
    out = []
    with evaluation_mode(backbone, head), torch.inference_mode():
        for index, x in enumerate(batches):
            logits = head(backbone(x))
            if index == 0:
                batches.check_logits(logits)
            out.append(logits.argmax(dim=-1).cpu())
    return torch.cat(out)


def to_jsonable(value: Any) -> Any:
    """Plain Python floats/ints/lists/dicts, so results go straight to ``json.dumps``."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
