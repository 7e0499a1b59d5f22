"""Weight-disentanglement error ξ(α1, α2) of a pair of task vectors.

Ortiz-Jiménez et al. (NeurIPS 2023, "Task arithmetic in the tangent space", Eq. 3) call a
model *weight disentangled* with respect to τ1, τ2 when adding α2·τ2 leaves the function
on task 1's inputs as θ0 + α1·τ1 left it, and vice versa. They measure the failure as

    ξ(α1, α2) = Σ_{t∈{1,2}} E_{x∈D_t} 1[ f(x; θ0 + α_t·τ_t) ≠ f(x; θ0 + α1·τ1 + α2·τ2) ],

where f(x; θ) is task t's *prediction* (its head's argmax). ξ ∈ [0, 2]; 0 on the whole
grid means the two vectors can be added at any scale without either task noticing the
other — the property that makes task arithmetic work (DESIGN.md §2). OrthoReg's argument
(Liu et al. 2026) is that orthogonal ΔW make ξ small near the origin.

Cost. Every grid point is a different weight vector, so a non-linear model needs one
forward pass per point and task; the points are visited in place on one resident backbone
(:class:`~orthoreg.evaluation.resident.ResidentModel`) over inputs cut into batches once.
The single-task terms need no extra passes: f(x; θ0 + α1·τ1) is the grid point (α1, 0).
For tangent (``linear``) vectors the features f0 + α1·Jτ1 + α2·Jτ2 are exact in the
coefficients, so one JVP per vector and batch serves the whole grid
(:class:`~orthoreg.evaluation.grid.LinearGrid`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from orthoreg.diagnostics.base import TaskProbe
from orthoreg.evaluation.accuracy import EvalBatches, model_device
from orthoreg.evaluation.grid import (
    GRID_PREDICTORS,
    check_vectors,
    coefficient_grid,
    resolve_paradigm,
)
from orthoreg.evaluation.resident import ResidentModel, as_resident

#: the default grid: 13 × 13 points over [−3, 3] (step 0.5), as in Ortiz-Jiménez et al.'s plots
DEFAULT_POINTS = 13
DEFAULT_RANGE = 3.0
#: the scalar summary averages ξ over grid points with α1² + α2² ≤ DISK_RADIUS²
DISK_RADIUS = 1.0


def alpha_grid(points: int = DEFAULT_POINTS, extent: float = DEFAULT_RANGE) -> list[float]:
    """``points`` evenly spaced coefficients in [−extent, extent] (odd ``points`` include 0)."""
    if points < 2:
        raise ValueError(f"a disentanglement grid needs ≥ 2 points per axis, got {points}")
    if not (math.isfinite(extent) and extent > 0):
        raise ValueError(f"the grid range must be a positive number, got {extent!r}")
    return [round(-extent + 2 * extent * i / (points - 1), 12) for i in range(points)]


@dataclass(frozen=True)
class DisentanglementMap:
    """ξ over a grid: ``xi[i, j]`` is ξ(α1 = alphas[i], α2 = alphas[j]).

    ``per_task[t]`` is task t's term (the disagreement rate on its own inputs); ``seconds``
    is the wall time of the whole computation, validation included.
    """

    tasks: tuple[str, str]
    alphas: tuple[float, ...]
    xi: Tensor
    per_task: tuple[Tensor, Tensor]
    paradigm: str
    examples: tuple[int, int]
    seconds: float
    forward_passes: int

    def disk_mean(self, radius: float = DISK_RADIUS) -> float:
        """Mean ξ over the grid points inside α1² + α2² ≤ radius² (NaN if none are)."""
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        inside = (alphas[:, None] ** 2 + alphas[None, :] ** 2) <= radius**2 + 1e-12
        if not inside.any():
            return float("nan")
        return float(self.xi[inside].mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "alphas": list(self.alphas), "paradigm": self.paradigm,
            "xi": self.xi.tolist(), "per_task": [term.tolist() for term in self.per_task],
            "disk_mean": self.disk_mean(), "disk_radius": DISK_RADIUS,
            "max": float(self.xi.max()), "examples": list(self.examples),
            "seconds": self.seconds, "forward_passes": self.forward_passes,
        }


def _grid_points(alphas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All (α1, α2) pairs, plus the axis points (α, 0) and (0, α) if 0 is not on the grid.

    Returns (points [P, 2], row of (α_i, 0) per i, row of (0, α_j) per j).
    """
    n = len(alphas)
    first, second = torch.meshgrid(alphas, alphas, indexing="ij")
    points = torch.stack([first.reshape(-1), second.reshape(-1)], dim=1)
    zero = (alphas == 0).nonzero()
    if len(zero):
        z = int(zero[0])
        return points, torch.arange(n) * n + z, z * n + torch.arange(n)
    axis_one = torch.stack([alphas, torch.zeros_like(alphas)], dim=1)
    axis_two = torch.stack([torch.zeros_like(alphas), alphas], dim=1)
    return (torch.cat([points, axis_one, axis_two]), n * n + torch.arange(n),
            n * n + n + torch.arange(n))


def disentanglement_error(
    backbone: nn.Module | ResidentModel,
    tasks: Sequence[TaskProbe],
    vectors: Sequence[Mapping[str, Tensor]],
    alphas: Sequence[float] | None = None,
    paradigm: str | None = None,
    max_examples: int | None = 128,
    batch_size: int = 256,
    seed: int = 0,
) -> DisentanglementMap:
    """ξ(α1, α2) of ``vectors`` = (τ1, τ2) for ``tasks`` = (task 1, task 2) on a grid.

    ``alphas`` is the per-axis grid (default :func:`alpha_grid` ()); each task's head
    predicts on at most ``max_examples`` of its inputs (a seeded subset). The paradigm
    comes from the vectors' metadata unless named. Everything is validated before the
    first forward pass, and the backbone is left exactly at θ0.
    """
    started = time.perf_counter()
    if len(tasks) != 2 or len(vectors) != 2:
        raise ValueError(f"ξ needs exactly two tasks and two vectors, got {len(tasks)} and "
                         f"{len(vectors)}")
    vector_list = check_vectors(list(vectors))
    name = resolve_paradigm(vector_list, paradigm)
    axis = coefficient_grid(alpha_grid() if alphas is None else list(alphas))[:, 0]
    points, single_one, single_two = _grid_points(axis)
    resident = as_resident(backbone)
    device = model_device(resident.backbone)
    prepared = []
    for task in tasks:
        try:
            prepared.append(EvalBatches(task.sample(max_examples, seed), batch_size, device))
        except ValueError as error:
            raise type(error)(f"task {task.name!r}: {error}") from error
    local = [resident.localize(vector) for vector in vector_list]
    n = len(axis)
    terms = []
    passes = 0
    for index, (task, batches) in enumerate(zip(tasks, prepared)):
        predictions = GRID_PREDICTORS[name](resident, task.head, batches, local, points)
        joint = predictions[: n * n].reshape(n, n, -1)
        if index == 0:  # f(x; θ0 + α1·τ1) for every row i
            single = predictions[single_one][:, None, :]
        else:  # f(x; θ0 + α2·τ2) for every column j
            single = predictions[single_two][None, :, :]
        terms.append((joint != single).double().mean(dim=-1))
        batch_count = math.ceil(len(batches) / batches.batch_size)
        passes += batch_count * (len(vector_list) if name == "linear" else len(points))
    return DisentanglementMap(
        tasks=(tasks[0].name, tasks[1].name), alphas=tuple(float(a) for a in axis),
        xi=terms[0] + terms[1], per_task=(terms[0], terms[1]), paradigm=name,
        examples=(len(prepared[0]), len(prepared[1])),
        seconds=time.perf_counter() - started, forward_passes=passes,
    )
