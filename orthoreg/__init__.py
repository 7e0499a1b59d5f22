"""orthoreg: orthogonality-regularised fine-tuning for composable task arithmetic."""

from orthoreg._version import __version__
from orthoreg.regularizer import OrthoReg, lowrank_penalty, orthoreg_penalty
from orthoreg.taskvector import TaskVector, TaskVectorMismatch

__all__ = [
    "OrthoReg",
    "TaskVector",
    "TaskVectorMismatch",
    "__version__",
    "lowrank_penalty",
    "orthoreg_penalty",
]
