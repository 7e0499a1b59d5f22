"""Fine-tuning paradigms, by name: ``full``, ``linear``, ``partial``, ``lora``."""

from __future__ import annotations

from typing import Any

from orthoreg.paradigms.base import (
    SELECTION_PRESETS,
    FineTunable,
    Paradigm,
    base_state,
    freeze_normalization,
    parameter_rule,
)
from orthoreg.paradigms.full import Full, Partial
from orthoreg.paradigms.linear import Linear, LinearizedModel
from orthoreg.paradigms.lora import LORA_TARGETS, Lora

PARADIGMS: dict[str, type[Paradigm]] = {cls.name: cls for cls in (Full, Linear, Partial, Lora)}


def get_paradigm(name: str, **options: Any) -> Paradigm:
    """Instantiate a paradigm by name; options go to its constructor."""
    try:
        cls = PARADIGMS[name]
    except KeyError:
        raise KeyError(f"unknown paradigm {name!r}; choose from {sorted(PARADIGMS)}") from None
    return cls(**options)


__all__ = [
    "LORA_TARGETS",
    "PARADIGMS",
    "SELECTION_PRESETS",
    "FineTunable",
    "Full",
    "Linear",
    "LinearizedModel",
    "Lora",
    "Paradigm",
    "Partial",
    "base_state",
    "freeze_normalization",
    "get_paradigm",
    "parameter_rule",
]
