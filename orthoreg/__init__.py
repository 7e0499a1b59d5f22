"""orthoreg: orthogonality-regularised fine-tuning for composable task arithmetic."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orthoreg._version import __version__

if TYPE_CHECKING:
    from orthoreg.regularizer import OrthoReg, lowrank_penalty, orthoreg_penalty
    from orthoreg.taskvector import TaskVector, TaskVectorMismatch

#: exported lazily (PEP 562), so that importing a submodule does not load torch: the command
#: line sets OpenMP's wait policy before torch starts its runtime (orthoreg.utils.threads)
_EXPORTS = {"OrthoReg": "orthoreg.regularizer", "lowrank_penalty": "orthoreg.regularizer",
            "orthoreg_penalty": "orthoreg.regularizer", "TaskVector": "orthoreg.taskvector",
            "TaskVectorMismatch": "orthoreg.taskvector"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'orthoreg' has no attribute {name!r}")

__all__ = [
    "OrthoReg",
    "TaskVector",
    "TaskVectorMismatch",
    "__version__",
    "lowrank_penalty",
    "orthoreg_penalty",
]
