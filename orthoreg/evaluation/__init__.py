"""Accuracy, exact coefficient search and the task-arithmetic protocols (DESIGN.md §2).

- :mod:`~orthoreg.evaluation.accuracy` — ``head(backbone(x))`` predictions on tensor data;
- :mod:`~orthoreg.evaluation.resident` — θ0 + Σ α·τ in place, restored bit-exactly;
- :mod:`~orthoreg.evaluation.grid` — a whole coefficient grid per paradigm (one JVP per
  batch for tangent vectors);
- :mod:`~orthoreg.evaluation.protocols` — addition and negation with α chosen on val.
"""

from orthoreg.evaluation.accuracy import (
    EmptyDatasetError,
    EvalBatches,
    accuracy,
    evaluation_mode,
    predict,
)
from orthoreg.evaluation.grid import (
    GRID_PREDICTORS,
    LinearGrid,
    check_vectors,
    coefficient_grid,
    grid_accuracy,
    grid_predictions,
    register_grid,
    resolve_paradigm,
)
from orthoreg.evaluation.protocols import (
    DEFAULT_ALPHAS,
    NEGATION_THRESHOLDS,
    AdditionResult,
    NegationChoice,
    NegationResult,
    TaskEval,
    addition,
    merge_vectors,
    negation,
    normalized_accuracy,
)
from orthoreg.evaluation.resident import ResidentModel, as_resident

__all__ = [
    "DEFAULT_ALPHAS",
    "GRID_PREDICTORS",
    "NEGATION_THRESHOLDS",
    "AdditionResult",
    "EmptyDatasetError",
    "EvalBatches",
    "LinearGrid",
    "NegationChoice",
    "NegationResult",
    "ResidentModel",
    "TaskEval",
    "accuracy",
    "addition",
    "as_resident",
    "check_vectors",
    "coefficient_grid",
    "evaluation_mode",
    "grid_accuracy",
    "grid_predictions",
    "merge_vectors",
    "negation",
    "normalized_accuracy",
    "predict",
    "register_grid",
    "resolve_paradigm",
]
