"""How orthogonal task vectors are: to each other, and within each layer's ΔW.

Two different things are called "orthogonal" in the OrthoReg argument (Liu et al. 2026):

- *between* tasks: cos(τ_i, τ_j) ≈ 0, whole and per layer — what task arithmetic needs so
  that adding τ_j does not move task i's weights (Ilharco et al. 2023 report it for CLIP);
- *within* one ΔW: ΔWᵀΔW ≈ I, i.e. R(ΔW) = ‖G − I‖_F ≈ 0 (the paper's Eq. for OrthoReg,
  G the smaller Gram) — what the penalty enforces. Its singular values all ≈ 1, and its
  columns are pairwise at ≈ 90° (the paper's Fig. 2 histograms of column angles).

Every function here takes task vectors (or tensors) only: no model, no data. Matrices are
the tensors the penalty acts on: ≥ 2-D, not normalisation parameters; conv kernels are
viewed as (out, in·kh·kw) (:func:`orthoreg.regularizer.as_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from orthoreg.regularizer import NORM_MARKERS, as_matrix, orthoreg_penalty
from orthoreg.taskvector import TaskVector

#: which vectors of a matrix the angle histogram compares
AngleAxis = str
ANGLE_AXES: dict[AngleAxis, Callable[[Tensor], Tensor]] = {
    # the vectors whose Gram the penalty uses: columns if rows ≥ cols, else rows
    "auto": lambda m: m if m.shape[0] >= m.shape[1] else m.T,
    "columns": lambda m: m,
    "rows": lambda m: m.T,
}


def _as_vector(vector: Mapping[str, Tensor]) -> TaskVector:
    return vector if isinstance(vector, TaskVector) else TaskVector(vector)


def is_matrix(name: str, tensor: Tensor) -> bool:
    """A tensor OrthoReg would regularise: ≥ 2-D and not a normalisation parameter."""
    lowered = name.lower()
    return tensor.ndim >= 2 and not any(marker in lowered for marker in NORM_MARKERS)


def matrices(vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ΔW of a task vector as float64 matrices, by parameter name, in the vector's order."""
    return {name: as_matrix(t.detach().double().cpu()) for name, t in vector.items()
            if is_matrix(name, t)}


# ------------------------------------------------------------------ between task vectors
def cosine_matrix(vectors: Sequence[Mapping[str, Tensor]]) -> list[list[float]]:
    """cos(τ_i, τ_j) for every pair, over all tensors (float64 accumulation)."""
    task_vectors = [_as_vector(v) for v in vectors]
    return [[a.cosine(b) for b in task_vectors] for a in task_vectors]


def layer_cosines(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, float]:
    """cos(τ1[l], τ2[l]) per tensor l: where in the network two tasks' updates collide."""
    return _as_vector(first).per_layer_cosine(_as_vector(second))


def alignment_by_parameter(vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Where the size and the alignment of a set of task vectors live, per tensor.

    For each tensor l: ``norm_share`` = Σ_t ‖τ_t[l]‖² / Σ_t ‖τ_t‖² and ``dot_share`` =
    Σ_{i<j} ⟨τ_i[l], τ_j[l]⟩ / Σ_{i<j} ⟨τ_i, τ_j⟩ (both sum to 1 over tensors; a dot share
    may be negative or exceed 1 when tensors disagree in sign), plus ``cosine``, the mean
    pairwise cosine of that tensor alone. Why: a high whole-vector cosine may come from one
    tensor that every task moves the same way (the text benchmark's word embeddings under
    OrthoReg with Adam, docs/TEXT.md) rather than from the layers that learn the tasks.
    Needs ≥ 2 vectors; float64 accumulation."""
    task_vectors = [_as_vector(v) for v in vectors]
    if len(task_vectors) < 2:
        raise ValueError("alignment_by_parameter needs at least 2 task vectors")
    for other in task_vectors[1:]:
        task_vectors[0].check_compatible(other)
    squares: dict[str, float] = {}
    dots: dict[str, float] = {}
    cosines: dict[str, float] = {}
    pairs = [(i, j) for i in range(len(task_vectors)) for j in range(i + 1, len(task_vectors))]
    for name in task_vectors[0]:
        flat = torch.stack([v[name].detach().double().cpu().flatten() for v in task_vectors])
        gram = flat @ flat.T
        norms = gram.diagonal().sqrt()
        squares[name] = float(gram.diagonal().sum())
        dots[name] = sum(float(gram[i, j]) for i, j in pairs)
        cosines[name] = sum(float(gram[i, j] / (norms[i] * norms[j]))
                            if float(norms[i] * norms[j]) > 0 else 0.0
                            for i, j in pairs) / len(pairs)
    total_square, total_dot = sum(squares.values()), sum(dots.values())
    return {name: {"norm_share": squares[name] / total_square if total_square else 0.0,
                   "dot_share": dots[name] / total_dot if total_dot else 0.0,
                   "cosine": cosines[name]}
            for name in squares}


# ------------------------------------------------------------------ within one ΔW
def layer_penalties(vector: Mapping[str, Tensor], squared: bool = False) -> dict[str, float]:
    """R(ΔW) = ‖G − I‖_F per matrix (``squared``: ‖G − I‖²_F, the paper's text form)."""
    return {name: float(orthoreg_penalty(matrix, squared=squared))
            for name, matrix in matrices(vector).items()}


def singular_values(vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The singular values of each ΔW, descending (min(out, in·k·k) of them, float64)."""
    return {name: torch.linalg.svdvals(matrix) for name, matrix in matrices(vector).items()}


def effective_rank(values: Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli 2007): 1 for rank one, n for a flat spectrum.

    A compact way to see whether ΔW is the near-low-rank update plain fine-tuning gives or
    the flat, orthogonal-like spectrum OrthoReg pushes towards.
    """
    total = float(values.sum())
    if total <= 0:
        return 0.0
    p = values.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_summary(values: Tensor) -> dict[str, float]:
    """σ_max, σ_min, effective rank and the penalty's view Σ(σ² − 1)² = R(ΔW)²."""
    return {"max": float(values.max()), "min": float(values.min()),
            "effective_rank": effective_rank(values), "size": int(values.numel()),
            "penalty_from_spectrum": math.sqrt(float(((values.double() ** 2 - 1) ** 2).sum()))}


def column_angles(weight: Tensor, axis: AngleAxis = "auto", eps: float = 1e-12) -> Tensor:
    """Angles in degrees between every pair of columns of ``weight`` (i < j).

    The paper's Fig. 2 histogram: columns of an orthogonal matrix are all at 90°, those of
    a (near) low-rank update bunch near 0° and 180°. ``axis="auto"`` compares the vectors
    whose Gram OrthoReg penalises — columns of a tall or square matrix, rows of a wide one
    (a wide matrix cannot have more mutually orthogonal columns than it has rows).
    Zero-norm vectors have no direction and are left out.
    """
    if axis not in ANGLE_AXES:
        raise ValueError(f"unknown angle axis {axis!r}; choose from {sorted(ANGLE_AXES)}")
    columns = ANGLE_AXES[axis](as_matrix(weight.detach().double().cpu()))
    norms = columns.norm(dim=0)
    keep = norms > eps
    unit = columns[:, keep] / norms[keep]
    cos = (unit.T @ unit).clamp(-1.0, 1.0)
    upper = torch.triu_indices(cos.shape[0], cos.shape[1], offset=1)
    return torch.rad2deg(torch.arccos(cos[upper[0], upper[1]]))


def vector_angles(vector: Mapping[str, Tensor], axis: AngleAxis = "auto") -> Tensor:
    """Column angles of every ΔW of a task vector, pooled into one tensor of degrees."""
    angles = [column_angles(matrix, axis) for matrix in matrices(vector).values()]
    return torch.cat(angles) if angles else torch.empty(0, dtype=torch.float64)


def angle_histogram(angles: Tensor, bins: int = 45) -> dict[str, list[float]]:
    """Density histogram of angles over [0°, 180°]: {"edges": bins + 1, "density": bins}."""
    edges = torch.linspace(0.0, 180.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(angles.double(), bins=bins, min=0.0, max=180.0)
    total = float(counts.sum())
    density = counts / (total * (180.0 / bins)) if total else counts
    return {"edges": edges.tolist(), "density": density.tolist(), "count": int(total),
            "mean_abs_deviation_from_90": float((angles - 90).abs().mean()) if total else
            float("nan")}


def orthogonality_report(vector: Mapping[str, Tensor], squared: bool = False,
                         axis: AngleAxis = "auto", bins: int = 45) -> dict[str, object]:
    """Everything about one task vector's ΔW: per-layer R, spectra, pooled angle histogram."""
    spectra = singular_values(vector)
    penalties = layer_penalties(vector, squared)
    return {
        "norm": _as_vector(vector).norm(),
        "penalty_total": sum(penalties.values()),
        "layers": {name: {"penalty": penalties[name], "singular_values": values.tolist(),
                          **spectrum_summary(values)} for name, values in spectra.items()},
        "angles": angle_histogram(vector_angles(vector, axis), bins),
        "angle_axis": axis, "squared": squared,
    }
