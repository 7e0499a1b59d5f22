"""Offline models, datasets and frozen heads for the embedded benchmark (DESIGN.md §3).

Submodules: :mod:`~orthoreg.zoo.assets` (pinned archives), :mod:`~orthoreg.zoo.models`
(backbones), :mod:`~orthoreg.zoo.datasets` (tasks and splits), :mod:`~orthoreg.zoo.heads`
(frozen few-shot heads). Names are loaded lazily so ``python -m orthoreg.zoo.assets`` runs
without importing its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AssetCorrupted": "assets",
    "AssetMissing": "assets",
    "fetch": "assets",
    "Backbone": "models",
    "get_model": "models",
    "MODELS": "models",
    "CONTROL_TASK": "datasets",
    "DEFAULT_TASKS": "datasets",
    "TASKS": "datasets",
    "TaskData": "datasets",
    "get_task": "datasets",
    "preprocess": "datasets",
    "task_datasets": "datasets",
    "Head": "heads",
    "fit_head": "heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"orthoreg.zoo.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'orthoreg.zoo' has no attribute {name!r}")
