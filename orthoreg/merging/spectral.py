"""Spectral merges of each weight matrix: Task Singular Vectors (TSV-M) and Isotropic (Iso-C).

Both act on the singular value decomposition of each layer's update, where interference
shows up as overlapping singular subspaces. Tensors that are not matrices (biases, norm
scales) have no such structure and are combined plainly, as set by ``nonmatrix``. Which
tensors count as matrices is ``nd_tensors``: by default exactly the 2-D ones, as in both
references' code (``len(shape) == 2``), so a ViT's patch-embedding convolution is averaged;
``nd_tensors="reshape"`` merges conv kernels spectrally as (out, in·kh·kw) matrices.
Both merges re-scale what they return, so their references search α on 0.1…3.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from orthoreg.merging.base import compute_dtype, merge_per_tensor
from orthoreg.merging.linear import weighted_sum
from orthoreg.merging.ops import as_matrix, flatten_spectrum, task_singular_vector_merge
from orthoreg.merging.registry import WIDE_ALPHAS, in_range, one_of, optional, register
from orthoreg.taskvector import TaskVector

NONMATRIX_CHOICES = ("mean", "sum")
#: ≥ 3-D tensors: combined like non-matrices (the references), or reshaped to matrices
ND_CHOICES = ("nonmatrix", "reshape")
_WIDE_SOURCE = ("Gargiulo et al. 2025 (TSV) reference code, np.linspace(0, 3, 31)[1:]: "
                "0.1, 0.2, …, 3.0 (also Iso-C's code, built on it)")


def combine_nonmatrix(tensors: Sequence[Tensor], how: str) -> Tensor:
    """Mean or sum of the tasks' values for a bias or norm parameter."""
    total = weighted_sum(tensors)
    return total.div_(len(tensors)) if how == "mean" else total


def tsv_rank(rows: int, cols: int, num_tasks: int, rank_fraction: float | None) -> int:
    """How many singular triplets each task keeps: ⌊min(m, n)·fraction⌋, at least 1.

    The default fraction 1/T makes the T truncated bases together fill at most the full
    rank min(m, n), so after orthogonalisation every task gets its own slice of it.
    """
    full = min(rows, cols)
    if rank_fraction is None:
        return max(1, full // num_tasks)
    return max(1, math.floor(full * rank_fraction + 1e-9))


@register(
    "tsv",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in "
          "Model Merging (CVPR), TSV-Merge",
    constraints={
        "rank_fraction": optional(in_range(0.0, 1.0, low_open=True)),
        "nonmatrix": one_of(*NONMATRIX_CHOICES),
        "nd_tensors": one_of(*ND_CHOICES),
    },
    alphas=WIDE_ALPHAS,
    alphas_source=_WIDE_SOURCE,
)
def tsv(
    task_vectors: Sequence[TaskVector],
    *,
    rank_fraction: float | None = None,
    nonmatrix: str = "mean",
    nd_tensors: str = "nonmatrix",
) -> TaskVector:
    """TSV-Merge (Gargiulo et al. 2025): per layer, low-rank task SVDs, decorrelated, summed.

    For each 2-D matrix and each task t: the top-r singular triplets (U_t, σ_t, V_t) with r = ⌊min(m, n)·rank_fraction⌋ ≥ 1; concatenate
    U = [U_1 … U_T], σ = [σ_1 … σ_T], V = [V_1 … V_T]; orthogonalise U and V by orthogonal
    Procrustes (U⊥ = P Qᵀ from U = P S Qᵀ, likewise V); return U⊥ diag(σ) V⊥ᵀ. When the
    tasks' subspaces are already orthogonal, this is exactly the sum of the truncated
    task matrices.

    Defaults: ``rank_fraction=None`` → 1/T, the paper's choice (it uses ⌊min(m, n)/T⌋;
    the ≥ 1 floor here keeps layers with fewer singular values than tasks from being
    zeroed, where the authors' code would drop them); ``nonmatrix="mean"``: non-matrix
    tensors are *averaged*, as in the authors' implementation (the paper applies TSV to
    matrices only); ``nd_tensors="nonmatrix"``: conv kernels and other ≥ 3-D tensors are
    non-matrices too, as in the authors' code (``"reshape"``: SVD of (out, in·kh·kw), this
    project's earlier behaviour). The result is the merged task vector; α is the caller's
    (the reference searches 0.1…3.0).
    """
    num_tasks = len(task_vectors)
    reshape_nd = nd_tensors == "reshape"

    def merge_tensor(_: str, tensors: Sequence[Tensor]) -> Tensor:
        dtype = compute_dtype(tensors[0])
        matrices = [as_matrix(tensor.to(dtype), reshape_nd) for tensor in tensors]
        if matrices[0] is None:
            return combine_nonmatrix(tensors, nonmatrix)
        rows, cols = matrices[0].shape
        rank = tsv_rank(rows, cols, num_tasks, rank_fraction)
        merged = task_singular_vector_merge(matrices, rank)  # type: ignore[arg-type]
        return merged.reshape(tensors[0].shape)

    return merge_per_tensor(task_vectors, merge_tensor)


@register(
    "iso_c",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common "
          "and Task-Specific Subspaces (ICML), Iso-C",
    constraints={"nonmatrix": one_of(*NONMATRIX_CHOICES), "nd_tensors": one_of(*ND_CHOICES)},
    alphas=WIDE_ALPHAS,
    alphas_source=_WIDE_SOURCE,
)
def iso_c(
    task_vectors: Sequence[TaskVector], *, nonmatrix: str = "mean", nd_tensors: str = "nonmatrix"
) -> TaskVector:
    """Iso-C (Marczak et al. 2025): per layer, the task-arithmetic sum with a flat spectrum.

    For each 2-D matrix: M = Σ_t τ_t = U diag(σ) Vᵀ (thin SVD),
    merged = σ̄·U Vᵀ with σ̄ = mean of all min(m, n) singular values of M. The merged
    matrix has M's singular vectors and M's trace norm, with every direction equally
    weighted. If M is rank-deficient its null directions are raised to σ̄ too, as in the
    authors' code.

    Defaults: ``nonmatrix="mean"``: non-matrix tensors (biases, norms) are *averaged*,
    as in the authors' implementation (which sums the matrices but averages the rest);
    ``nonmatrix="sum"`` gives plain task arithmetic for them instead;
    ``nd_tensors="nonmatrix"``: conv kernels and other ≥ 3-D tensors are non-matrices too,
    as in the authors' code (``"reshape"``: flatten the spectrum of (out, in·kh·kw), this
    project's earlier behaviour). α is the caller's (the reference searches 0.1…3.0).
    """
    reshape_nd = nd_tensors == "reshape"

    def merge_tensor(_: str, tensors: Sequence[Tensor]) -> Tensor:
        if as_matrix(tensors[0], reshape_nd) is None:
            return combine_nonmatrix(tensors, nonmatrix)
        total = as_matrix(weighted_sum(tensors))
        return flatten_spectrum(total).reshape(tensors[0].shape)  # type: ignore[arg-type]

    return merge_per_tensor(task_vectors, merge_tensor)
