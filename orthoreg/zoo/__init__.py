"""Offline model families for the embedded benchmarks, and what they share (DESIGN.md §3).

Shared here: :mod:`~orthoreg.zoo.assets` (pinned, sha256-verified archives read in place),
:mod:`~orthoreg.zoo.splits` (seeded, class-balanced, hashed splits) and
:mod:`~orthoreg.zoo.registry` (the families the experiment pipeline can run). One
subpackage per family: :mod:`~orthoreg.zoo.vision` (ImageNet CNNs, grey-scale image tasks,
prototype heads). Zero-shot heads from class names and templates are
:mod:`orthoreg.heads`; the paper's CLIP recipe is :mod:`orthoreg.clip`.

The image family's most used names are re-exported lazily (``zoo.get_model``,
``zoo.get_task`` …), so ``python -m orthoreg.zoo.assets`` runs without importing its own
module twice and ``import orthoreg.zoo`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AssetCorrupted": "assets",
    "AssetMissing": "assets",
    "fetch": "assets",
    "family_of": "registry",
    "get_family": "registry",
    "PreparedTask": "registry",
    "Backbone": "vision.models",
    "get_model": "vision.models",
    "MODELS": "vision.models",
    "CONTROL_TASK": "vision.datasets",
    "DEFAULT_TASKS": "vision.datasets",
    "TASKS": "vision.datasets",
    "TaskData": "vision.datasets",
    "get_task": "vision.datasets",
    "preprocess": "vision.datasets",
    "task_datasets": "vision.datasets",
    "Head": "vision.heads",
    "fit_head": "vision.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"orthoreg.zoo.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'orthoreg.zoo' has no attribute {name!r}")
