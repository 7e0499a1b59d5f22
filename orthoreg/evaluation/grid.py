"""Predictions and accuracy of θ0 + Σ_k c_k·τ_k over a whole grid of coefficients.

One entry point for every paradigm (:func:`grid_predictions`), dispatching through a small
registry on *how* a paradigm's vector acts:

- weight space (``full``, ``partial``, ``lora``): the backbone's weights are moved in place
  to each grid point (:class:`~orthoreg.evaluation.resident.ResidentModel`); one forward
  pass over the data per point, which is the floor for a non-linear model;
- tangent space (``linear``, Ortiz-Jiménez et al. 2023, Eq. 4): the linearised features are
  f0(x) + Σ c_k·J(x)τ_k, exact in the coefficients, so one JVP per vector and batch gives
  the features at *every* grid point (:class:`LinearGrid`). The head is applied per point:
  heads may normalise features (CLIP's cosine zero-shot heads), so logits need not be
  linear in c even though features are.

The grid is several vectors wide for the weight-disentanglement error ξ(α1, α2)
(DESIGN.md §2), one wide for the addition and negation searches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from orthoreg.evaluation.accuracy import (
    EvalBatches,
    evaluation_mode,
    model_device,
    predict_batches,
)
from orthoreg.evaluation.resident import ResidentModel, as_resident
from orthoreg.paradigms.linear import LinearizedModel
from orthoreg.taskvector import TaskVector, TaskVectorMismatch, check_all_compatible

#: (resident backbone, head, batches, localized vectors, coefficients [P, V]) -> labels [P, N]
GridPredictor = Callable[[ResidentModel, nn.Module, EvalBatches, list[TaskVector], Tensor], Tensor]

GRID_PREDICTORS: dict[str, GridPredictor] = {}

#: rows (grid points × batch) the head sees at once in the tangent-space grid
HEAD_ROWS = 8192


def register_grid(*paradigms: str) -> Callable[[GridPredictor], GridPredictor]:
    """Register how vectors of ``paradigms`` are evaluated over a coefficient grid."""

    def decorate(predictor: GridPredictor) -> GridPredictor:
        for name in paradigms:
            if name in GRID_PREDICTORS:
                raise ValueError(f"a grid evaluator for paradigm {name!r} is already registered")
            GRID_PREDICTORS[name] = predictor
        return predictor

    return decorate


# ----------------------------------------------------------------------------- validation
def check_vectors(vectors: Sequence[Mapping[str, Tensor]]) -> list[TaskVector]:
    """Vectors that may be combined: same base model, paradigm, names and shapes.

    ``TaskVector.check_compatible`` lets a vector without a fingerprint pass, so identity
    keys are also compared across all vectors, not only against the first.
    """
    out = [v if isinstance(v, TaskVector) else TaskVector(v) for v in vectors]
    check_all_compatible(out)
    return out


def resolve_paradigm(vectors: Sequence[TaskVector], paradigm: str | None = None) -> str:
    """The paradigm the vectors were trained in (their metadata), or the one named.

    A named paradigm that contradicts the metadata is a TaskVectorMismatch: evaluating a
    tangent vector in weight space (or the reverse) gives a wrong but plausible number.
    """
    recorded = {v.metadata["paradigm"] for v in vectors if v.metadata.get("paradigm")}
    if len(recorded) > 1:
        raise TaskVectorMismatch(f"task vectors come from different paradigms: {sorted(recorded)}")
    found = next(iter(recorded), None)
    if paradigm is not None and found is not None and paradigm != found:
        raise TaskVectorMismatch(f"paradigm {paradigm!r} requested, but the vectors are {found!r}")
    name = paradigm or found
    if name is None:
        raise ValueError("the task vectors record no paradigm; pass paradigm= explicitly")
    if name not in GRID_PREDICTORS:
        raise ValueError(f"no grid evaluator for paradigm {name!r}; known: {sorted(GRID_PREDICTORS)}")
    return name


def coefficient_grid(coefficients: Sequence[float] | Sequence[Sequence[float]] | Tensor,
                     num_vectors: int = 1) -> Tensor:
    """Coefficients as a float64 [points, vectors] tensor; ValueError if empty or not finite."""
    grid = torch.as_tensor(coefficients, dtype=torch.float64)
    if grid.ndim == 1 and num_vectors == 1:
        grid = grid[:, None]
    if grid.ndim != 2 or grid.shape[1] != num_vectors:
        raise ValueError(f"expected coefficients of shape [points, {num_vectors}], "
                         f"got {tuple(grid.shape)}")
    if grid.shape[0] == 0:
        raise ValueError("the coefficient grid is empty")
    if not torch.isfinite(grid).all():
        raise ValueError(f"coefficients must be finite, got {grid.flatten().tolist()}")
    return grid


# ----------------------------------------------------------------------------- weight space
@register_grid("full", "partial", "lora")
def weight_space_predictions(resident: ResidentModel, head: nn.Module, batches: EvalBatches,
                             vectors: list[TaskVector], coefficients: Tensor) -> Tensor:
    """One in-place edit and one forward pass over the data per grid point."""
    rows = []
    for point in coefficients.tolist():
        with resident.edited(*zip(vectors, point)) as backbone:
            rows.append(predict_batches(backbone, head, batches))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- tangent space
class LinearGrid:
    """Logits of the linearised model at every grid point from one JVP per vector and batch.

    features(c) = f0(x) + Σ_k c_k·J(x)τ_k is exact (f_lin is linear in Δ); the head then runs
    on each point's features, so normalising heads are handled correctly.
    """

    def __init__(self, linearized: LinearizedModel, head: nn.Module,
                 vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor,
                 head_rows: int = HEAD_ROWS) -> None:
        self.linearized = linearized
        self.head = head
        self.vectors = list(vectors)
        self.coefficients = coefficient_grid(coefficients, len(self.vectors))
        self.head_rows = head_rows

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f0 [B, *F], J·τ_k stacked [V, B, *F]) for one batch."""
        f0 = None
        tangents = []
        for vector in self.vectors:
            value, jvp_out = self.linearized.value_and_jvp(x, vector)
            f0 = value if f0 is None else f0
            tangents.append(jvp_out)
        return f0, torch.stack(tangents)

    def logits(self, x: Tensor) -> Tensor:
        """Logits [points, B, classes] at every grid point."""
        f0, jvps = self.features(x)
        coefficients = self.coefficients.to(device=f0.device, dtype=f0.dtype)
        batch = f0.shape[0]
        flat_jvps = jvps.reshape(len(self.vectors), -1)
        chunk = max(1, self.head_rows // max(1, batch))
        out = []
        for start in range(0, len(coefficients), chunk):
            block = coefficients[start : start + chunk]
            feats = f0.unsqueeze(0) + (block @ flat_jvps).reshape(len(block), *f0.shape)
            logits = self.head(feats.reshape(len(block) * batch, *f0.shape[1:]))
            out.append(logits.reshape(len(block), batch, *logits.shape[1:]))
        return torch.cat(out)

    def predictions(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=-1)


@register_grid("linear")
def tangent_space_predictions(resident: ResidentModel, head: nn.Module, batches: EvalBatches,
                              vectors: list[TaskVector], coefficients: Tensor) -> Tensor:
    """One JVP per vector and batch for the whole grid (no per-point forward passes)."""
    grid = LinearGrid(resident.linearized(list(vectors[0].keys())), head, vectors, coefficients)
    columns = []
    with evaluation_mode(resident.backbone, head), torch.no_grad():
        for index, x in enumerate(batches):
            logits = grid.logits(x)
            if index == 0:
                batches.check_logits(logits[0])
            columns.append(logits.argmax(dim=-1).cpu())
    return torch.cat(columns, dim=1)


# ----------------------------------------------------------------------------- entry points
def grid_predictions(
    backbone: nn.Module | ResidentModel,
    head: nn.Module,
    dataset: Dataset | EvalBatches | tuple[Tensor, Tensor],
    vectors: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Sequence[Sequence[float]] | Tensor,
    paradigm: str | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Predicted labels [points, N] of head(f(x; θ0 + Σ_k c_k·τ_k)) at every grid point.

    ``vectors`` is one vector (then ``coefficients`` is a list of α) or several (then one
    row of coefficients per point). Everything is validated — vectors against each other
    and the backbone, the paradigm, the grid, the data — before the first forward pass.
    The backbone is left exactly at θ0.
    """
    vector_list = check_vectors([vectors] if isinstance(vectors, Mapping) else list(vectors))
    name = resolve_paradigm(vector_list, paradigm)
    grid = coefficient_grid(coefficients, len(vector_list))
    resident = as_resident(backbone)
    batches = (dataset if isinstance(dataset, EvalBatches)
               else EvalBatches(dataset, batch_size, model_device(resident.backbone)))
    local = [resident.localize(vector) for vector in vector_list]
    return GRID_PREDICTORS[name](resident, head, batches, local, grid)


def grid_accuracy(
    backbone: nn.Module | ResidentModel,
    head: nn.Module,
    dataset: Dataset | EvalBatches | tuple[Tensor, Tensor],
    vector: Mapping[str, Tensor],
    alphas: Sequence[float] | Tensor,
    paradigm: str | None = None,
    batch_size: int = 256,
) -> list[float]:
    """Accuracy of θ0 + α·τ for every α, in the order given (the coefficient search's inner loop)."""
    resident = as_resident(backbone)
    batches = (dataset if isinstance(dataset, EvalBatches)
               else EvalBatches(dataset, batch_size, model_device(resident.backbone)))
    predictions = grid_predictions(resident, head, batches, vector, alphas, paradigm)
    return [float(a) for a in batches.accuracy(predictions)]
