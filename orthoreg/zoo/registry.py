"""Model families of the embedded benchmarks: one registry the experiment pipeline reads.

A *family* is a set of backbones and the tasks they are benchmarked on, with everything
between a task's name and the three tensors the pipeline trains and evaluates on: the
task's seeded splits, the inputs prepared for the backbone (images resized and
normalised; texts tokenised) and the frozen head (prototypes; zero-shot class
embeddings). The pipeline (:mod:`orthoreg.experiment`) is family-agnostic: it asks
:func:`family_of` for the family of the configured model and goes through this interface.

To add a family, copy :mod:`orthoreg.zoo.vision.family`, implement the five methods, and
register it in :data:`FAMILIES` (a lazy import path, so an optional family's dependencies
load only when it is used).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class PreparedTask:
    """A task ready for the pipeline: inputs on the backbone's scale, per split."""

    name: str
    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset
    splits: dict[str, str]  # split name -> sha256 of its index array
    info: dict[str, Any]  # what the report should say about the data (e.g. truncation)


class Family(Protocol):
    """What the pipeline needs of a model family (see the module docstring)."""

    name: str
    control: str  # the default control task for negation

    def models(self) -> Collection[str]: ...

    def tasks(self) -> Collection[str]: ...

    def get_model(self, name: str) -> nn.Module: ...

    def prepare(self, backbone: nn.Module, task: str, data: Any) -> PreparedTask: ...

    def head_spec(self, model: str, prepared: PreparedTask, data: Any) -> dict[str, Any]:
        """Everything the frozen head depends on (its cache key)."""
        ...

    def build_head(self, backbone: nn.Module, prepared: PreparedTask, data: Any) -> nn.Module: ...

    def save_head(self, head: nn.Module, path: Path, metadata: dict[str, Any]) -> None: ...

    def load_head(self, path: Path) -> nn.Module: ...


#: family name -> "module:attribute" of its instance, imported on first use
FAMILIES: dict[str, str] = {
    "vision": "orthoreg.zoo.vision.family:FAMILY",
    "text": "orthoreg.zoo.text.family:FAMILY",
}

_loaded: dict[str, Family] = {}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    if name not in _loaded:
        module, attribute = FAMILIES[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), attribute)
    return _loaded[name]


def all_models() -> Mapping[str, str]:
    """Model name -> family name, over every registered family."""
    return {model: family for family in FAMILIES for model in get_family(family).models()}


def family_of(model: str) -> Family:
    """The family whose registry holds ``model`` (a KeyError naming the known ones if none)."""
    models = all_models()
    if model not in models:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(sorted(models))}")
    return get_family(models[model])
