"""orthoreg: orthogonality-regularised fine-tuning for composable task arithmetic."""

__version__ = "0.1.0"

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
