"""Task vectors τ = θ_ft − θ0 that behave like numbers.

``sum(vectors)``, ``-τ``, ``0.3 * τ``, ``τ.cosine(other)``: Ilharco et al.'s task
arithmetic is literally vector arithmetic, so the type should read that way. Every
operation checks that both sides come from the same base model and paradigm and name the
same tensors with the same shapes; a mismatch fails loudly, naming the first offender.

TaskVector is the lowest data type here and must not know any training stack, so it has
no constructors from one: those live with their bridge (e.g.
:func:`orthoreg.integrations.hf.task_vector_from_pretrained`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from orthoreg.errors import OrthoRegError
from orthoreg.utils.io import read_tensors, save_tensors
from orthoreg.utils.provenance import fingerprint_state, versions

#: metadata keys that must agree for two vectors to be combined
_IDENTITY_KEYS = ("base_fingerprint", "paradigm")


class TaskVectorMismatch(OrthoRegError, ValueError):
    """Two task vectors (or a vector and a model) that cannot be combined."""


class TaskVector(Mapping[str, Tensor]):
    """A mapping from base-model parameter names to updates, plus a provenance record."""

    __slots__ = ("metadata", "tensors")

    def __init__(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None):
        if not tensors:
            raise ValueError("a task vector needs at least one tensor")
        self.tensors: dict[str, Tensor] = dict(tensors)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        keys: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TaskVector:
        """τ = finetuned − base over ``keys`` (default: every floating tensor both share).

        ``base`` must be a copy taken before training. ``model.state_dict()`` returns the live
        parameters, not a snapshot, so a θ0 captured as ``theta0 = model.state_dict()`` has
        followed every optimizer step and τ would be exactly zero. A zero vector merges and
        saves without complaint, so this is an error rather than a warning, which training
        logs would bury: a tensor that shares memory (the same ``data_ptr``) on both sides
        raises TaskVectorMismatch naming it. Capture θ0 with
        ``{k: v.detach().clone() for k, v in model.state_dict().items()}``; leave tensors
        that were frozen on purpose out of ``keys``, or clone them too.
        """
        names = keys if keys is not None else [
            k for k, v in finetuned.items() if torch.is_floating_point(v)
        ]
        diffs = {}
        for name in names:
            if name not in base:
                raise TaskVectorMismatch(f"base state dict has no tensor {name!r}")
            if name not in finetuned:
                raise TaskVectorMismatch(f"fine-tuned state dict has no tensor {name!r}")
            if base[name].shape != finetuned[name].shape:
                raise TaskVectorMismatch(
                    f"{name!r}: base shape {tuple(base[name].shape)} != "
                    f"fine-tuned shape {tuple(finetuned[name].shape)}"
                )
            if _same_memory(base[name], finetuned[name]):
                raise TaskVectorMismatch(
                    f"{name!r}: the base and fine-tuned tensors share memory, so τ would be "
                    "zero; capture θ0 before training as "
                    "{k: v.detach().clone() for k, v in model.state_dict().items()}"
                )
            diffs[name] = (finetuned[name].detach() - base[name].detach().to(finetuned[name]))
        meta = {"base_fingerprint": fingerprint_state(base), **(metadata or {})}
        return cls(diffs, meta)

    @classmethod
    def zeros_like(cls, other: TaskVector) -> TaskVector:
        return cls({k: torch.zeros_like(v) for k, v in other.items()}, other.metadata)

    # ----------------------------------------------------------------- mapping protocol
    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        info = {k: self.metadata[k] for k in ("paradigm", "task", "lambda") if k in self.metadata}
        return f"TaskVector({len(self)} tensors, norm={self.norm():.4g}, {info})"

    # ----------------------------------------------------------------- checks
    def check_compatible(self, other: TaskVector) -> None:
        """Raise TaskVectorMismatch naming the first differing key, shape or base model."""
        for key in _IDENTITY_KEYS:
            mine, theirs = self.metadata.get(key), other.metadata.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise TaskVectorMismatch(f"task vectors differ in {key}: {mine!r} vs {theirs!r}")
        if self.tensors.keys() != other.tensors.keys():
            only_mine = sorted(self.tensors.keys() - other.tensors.keys())
            only_theirs = sorted(other.tensors.keys() - self.tensors.keys())
            first = (only_mine or only_theirs)[0]
            side = "left" if only_mine else "right"
            raise TaskVectorMismatch(f"task vectors differ in keys: {first!r} only on the {side}")
        for name, tensor in self.tensors.items():
            theirs = other.tensors[name]
            if tensor.shape != theirs.shape:
                raise TaskVectorMismatch(
                    f"{name!r}: shape {tuple(tensor.shape)} vs {tuple(theirs.shape)}"
                )
            if tensor.dtype != theirs.dtype:
                raise TaskVectorMismatch(f"{name!r}: dtype {tensor.dtype} vs {theirs.dtype}")

    def _combined_metadata(self, other: TaskVector) -> dict[str, Any]:
        meta = {k: self.metadata[k] for k in _IDENTITY_KEYS if k in self.metadata}
        for k in _IDENTITY_KEYS:
            if k not in meta and k in other.metadata:
                meta[k] = other.metadata[k]
        tasks = [*_as_list(self.metadata.get("task")), *_as_list(other.metadata.get("task"))]
        if tasks:
            meta["task"] = tasks
        return meta

    # ----------------------------------------------------------------- algebra
    def map(self, fn, metadata: Mapping[str, Any] | None = None) -> TaskVector:
        """Apply ``fn`` to every tensor (name, tensor) -> tensor; keeps provenance."""
        return TaskVector({k: fn(k, v) for k, v in self.tensors.items()},
                          self.metadata if metadata is None else metadata)

    def __add__(self, other: TaskVector | int) -> TaskVector:
        if isinstance(other, int) and other == 0:  # makes sum([...]) work
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        self.check_compatible(other)
        return TaskVector({k: v + other.tensors[k] for k, v in self.tensors.items()},
                          self._combined_metadata(other))

    __radd__ = __add__

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __neg__(self) -> TaskVector:
        return self.map(lambda _, v: -v)

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, TaskVector) or not isinstance(scalar, int | float):
            return NotImplemented
        return self.map(lambda _, v: v * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> TaskVector:
        return self * (1.0 / scalar)

    def dot(self, other: TaskVector) -> float:
        self.check_compatible(other)
        return float(sum(
            torch.sum(v.double() * other.tensors[k].double()) for k, v in self.tensors.items()
        ))

    def norm(self) -> float:
        return math.sqrt(sum(float(v.double().square().sum()) for v in self.tensors.values()))

    def cosine(self, other: TaskVector) -> float:
        denom = self.norm() * other.norm()
        return 0.0 if denom == 0 else self.dot(other) / denom

    def per_layer_cosine(self, other: TaskVector) -> dict[str, float]:
        self.check_compatible(other)
        out = {}
        for name, tensor in self.tensors.items():
            a, b = tensor.double().flatten(), other.tensors[name].double().flatten()
            denom = float(a.norm() * b.norm())
            out[name] = 0.0 if denom == 0 else float(a @ b) / denom
        return out

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        return self.map(lambda _, v: v.to(device=device, dtype=dtype))

    # ----------------------------------------------------------------- application
    def check_against(self, state: Mapping[str, Tensor]) -> None:
        """Raise if this vector names a tensor the target lacks or has in another shape."""
        for name, tensor in self.tensors.items():
            if name not in state:
                raise TaskVectorMismatch(f"target model has no tensor {name!r}")
            if state[name].shape != tensor.shape:
                raise TaskVectorMismatch(
                    f"{name!r}: vector shape {tuple(tensor.shape)} vs target "
                    f"{tuple(state[name].shape)}"
                )

    def apply_to(
        self, target: nn.Module | Mapping[str, Tensor], alpha: float = 1.0
    ) -> nn.Module | dict[str, Tensor]:
        """θ + α·τ. A module is updated in place (and returned); a state dict is copied.

        Names and shapes are checked, not the base fingerprint: the target may rightly be
        an already edited model (θ0 + τ1, then + τ2), whose fingerprint is not θ0's. Where
        the target must be θ0, compare ``fingerprint_state`` with ``base_fingerprint``.
        """
        if isinstance(target, nn.Module):
            state = dict(target.named_parameters())
            state.update(dict(target.named_buffers()))
            self.check_against(state)
            with torch.no_grad():
                for name, tensor in self.tensors.items():
                    state[name].add_(tensor.to(state[name]), alpha=alpha)
            return target
        self.check_against(target)
        out = {k: v.clone() for k, v in target.items()}
        for name, tensor in self.tensors.items():
            out[name] = out[name] + alpha * tensor.to(out[name])
        return out

    # ----------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Safetensors + JSON metadata (base fingerprint, paradigm, λ, seed, versions)."""
        meta = {**self.metadata}
        meta.setdefault("versions", versions())
        meta["kind"] = "orthoreg.TaskVector"
        return save_tensors(path, self.tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TaskVector:
        tensors, meta = read_tensors(path, device)
        if meta.get("kind") not in (None, "orthoreg.TaskVector"):
            raise TaskVectorMismatch(f"{path}: holds a {meta['kind']!r}, not a task vector")
        if not tensors:
            raise TaskVectorMismatch(f"{path}: holds no tensors")
        return cls(tensors, meta)


def check_all_compatible(vectors: Sequence[TaskVector]) -> None:
    """Raise unless every vector can be combined with every other (keys, shapes, base, paradigm).

    ``check_compatible`` lets a vector without a fingerprint pass, so checking each vector
    against the first alone would accept [no-fingerprint, A, B]; the identity keys are
    therefore also compared across all vectors. Messages name the two vectors' indices.
    """
    if not vectors:
        raise ValueError("need at least one task vector")
    for index, other in enumerate(vectors[1:], start=1):
        try:
            vectors[0].check_compatible(other)
        except TaskVectorMismatch as error:
            raise TaskVectorMismatch(f"task vectors 0 and {index}: {error}") from error
    for key in _IDENTITY_KEYS:
        present = [(i, v.metadata[key]) for i, v in enumerate(vectors)
                   if v.metadata.get(key) is not None]
        for index, value in present[1:]:
            if value != present[0][1]:
                raise TaskVectorMismatch(
                    f"task vectors {present[0][0]} and {index} differ in {key}: "
                    f"{present[0][1]!r} vs {value!r}"
                )


def _same_memory(first: Tensor, second: Tensor) -> bool:
    """Whether two non-empty tensors start at the same address (one is a view of the other).

    Empty and storage-less (meta) tensors report address 0 whatever they are; they are
    never called shared.
    """
    if first.numel() == 0 or first.device != second.device:
        return False
    pointer = first.data_ptr()
    return pointer != 0 and pointer == second.data_ptr()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
