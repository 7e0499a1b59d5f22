"""Small pure functions over tensors from which the merge methods are composed.

Each helper is one idea of one paper (trim, elect a sign, average the agreeing entries,
drop and rescale, truncate a spectrum, orthogonalise a basis, flatten a spectrum), takes
and returns plain tensors, and never mutates its inputs. "Stacked" means a tensor of
shape (T, *shape) holding the T tasks' values for one parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


# --------------------------------------------------------------------- TIES (Yadav et al. 2023)
def kept_count(numel: int, density: float) -> int:
    """How many of ``numel`` entries a per-tensor trim keeps: ⌊density·numel⌋, as PEFT does.

    ``int(density * numel)``, float product and all (so 0.29·100 = 28.999… keeps 28, and a
    3-entry bias at density 0.2 keeps none): PEFT's ``magnitude_based_pruning`` counts this
    way, and per-tensor TIES is defined here as PEFT's, to the entry.
    """
    return min(numel, int(density * numel))


def trim_top_k(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``kept_count`` entries of largest magnitude, zero the rest (per tensor).

    TIES step 1, "Trim" (Yadav et al. 2023, Alg. 1: τ̂_t = keep_topk(τ_t, k)), applied to
    one tensor as PEFT's ``prune(…, method="magnitude")`` does: small updates are mostly
    redundant and only add interference. Among equal magnitudes at the threshold,
    ``topk`` (sorted, as PEFT calls it) decides which are kept.
    """
    numel = tensor.numel()
    keep = kept_count(numel, density)
    if keep >= numel:
        return tensor.clone()
    flat = tensor.reshape(-1)
    index = flat.abs().topk(keep, largest=True).indices
    trimmed = torch.zeros_like(flat)
    trimmed[index] = flat[index]
    return trimmed.reshape(tensor.shape)


def magnitude_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """The smallest magnitude a global TIES trim keeps, from every |τ| of one task at once.

    The original TIES code (``topk_values_mask``) ranks the whole flattened task vector: it
    keeps every entry with |τ| ≥ the (d − ⌊d·density⌋)-th smallest magnitude, d = the
    number of entries, ties at the threshold included. At density 1 that position is 0,
    where it would fail; every entry is kept (threshold 0).
    """
    flat = magnitudes.reshape(-1)
    position = flat.numel() - int(flat.numel() * density)
    if position <= 0:
        return flat.new_zeros(())
    return flat.kthvalue(position).values


def trim_below(tensor: Tensor, threshold: Tensor | float) -> Tensor:
    """``tensor`` with every entry of magnitude below ``threshold`` set to zero (a copy)."""
    return torch.where(tensor.abs() >= threshold, tensor, 0)


def mass_sign(stacked: Tensor) -> Tensor:
    """Per entry, sgn(Σ_t τ_t) ∈ {−1, 0, +1}: the sign carrying the most total magnitude."""
    return torch.sign(stacked.sum(dim=0))


def elect_sign(stacked: Tensor) -> Tensor:
    """Per entry, the sign (+1/−1) of the total mass Σ_t τ_t across tasks; a zero sum → +1.

    TIES step 2, "Elect" (Alg. 1: γ_m = sgn(Σ_t τ̂_t)): the sign carrying the most
    total magnitude wins, so one large update outvotes several tiny ones. The zero rule is
    PEFT's (``calculate_majority_sign_mask``: ``sum >= 0 → +1``); the original code instead
    gives zero sums the majority sign of the whole vector (:func:`resolve_zero_signs`).
    """
    total = stacked.sum(dim=0)
    return torch.where(total >= 0, 1, -1).to(stacked.dtype)


def resolve_zero_signs(sign: Tensor, majority: Tensor | float) -> Tensor:
    """Replace the zeros of a {−1, 0, +1} sign tensor by ``majority`` (the original's rule).

    The original TIES code sets ``majority`` = sgn(Σ of every elected sign in the model).
    """
    return torch.where(sign == 0, torch.as_tensor(majority, dtype=sign.dtype), sign)


def disjoint_mean(stacked: Tensor, sign: Tensor) -> Tensor:
    """Per entry, the mean over the tasks whose value is non-zero and agrees with ``sign``.

    TIES step 3, "Disjoint merge" (Alg. 1: τ_m = 1/|A| Σ_{t∈A} τ̂_t with
    A = {t : sgn(τ̂_t) = γ_m}): trimmed-away (zero) and dissenting entries neither add
    to the sum nor dilute the mean. Entries no task agrees on are 0. Selection is the
    original code's ``where(γ > 0, τ > 0, τ < 0)``, so a zero γ selects the negative values
    as there; for γ = ±1 this is PEFT's ``disjoint_merge`` too.
    """
    selected = torch.where(torch.where(sign > 0, stacked > 0, stacked < 0), stacked, 0)
    count = (selected != 0).sum(dim=0, dtype=stacked.dtype).clamp_(min=1)
    return selected.sum(dim=0).div_(count)


# --------------------------------------------------------------------- DARE (Yu et al. 2024)
def derived_seed(seed: int, *parts: str | int) -> int:
    """A 63-bit seed from ``seed`` and a path of names (task index, tensor name).

    Why not one generator for the whole merge: then a tensor's mask would depend on how
    many random numbers every earlier tensor drew, i.e. on key order. Hashing the path
    makes each (task, tensor) mask a function of the seed and its own name only.
    """
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def random_drop_rescale(tensor: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Zero each entry with probability ``drop_rate``; scale the survivors by 1/(1 − p).

    DARE, Drop And REscale (Yu et al. 2024, Sec. 3: m ~ Bernoulli(p), τ̃ = (1 − m)⊙τ,
    τ̂ = τ̃/(1 − p)): the rescale keeps E[τ̂] = τ, so the expected effect of the update on
    any linear read-out is unchanged while most entries become zero. ``generator`` must
    live on ``tensor``'s device.
    """
    if drop_rate == 0:
        return tensor.clone()
    keep = torch.rand(tensor.shape, generator=generator, device=tensor.device) >= drop_rate
    return torch.where(keep, tensor / (1.0 - drop_rate), 0)


# --------------------------------------------------------------------- spectra (TSV, Iso-C)
def as_matrix(tensor: Tensor, reshape_nd: bool = True) -> Tensor | None:
    """The 2-D view (out, rest) of a weight, or None where the spectral merges do not apply.

    Vectors and scalars (biases, norms) are never matrices. Conv kernels (out, in, kh, kw)
    become (out, in·kh·kw), the matrix the layer applies to an unfolded patch, when
    ``reshape_nd``; without it only 2-D tensors are matrices, which is the rule of the TSV
    and Iso-C reference code (``len(shape) == 2``: everything else is averaged).
    """
    if tensor.ndim < 2 or (tensor.ndim > 2 and not reshape_nd):
        return None
    return tensor.reshape(tensor.shape[0], -1)


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, σ, Vᵀ) with k = min(m, n) columns/rows: ``torch.linalg.svd(full_matrices=False)``.

    A wide matrix is decomposed through its transpose (a view, no copy): on CPU, LAPACK
    on a row-major wide matrix was measured ~2× slower than on its tall transpose (torch
    2.13, 768×2304: 0.83 s vs 0.41 s), and the factors are the same up to sign.
    """
    if matrix.shape[-2] >= matrix.shape[-1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = torch.linalg.svd(matrix.mT, full_matrices=False)
    return vh.mT, s, u.mT


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r, σ_r, V_rᵀ): the top-``rank`` singular triplets of a 2-D ``matrix``.

    A thin SVD then a slice; exact, unlike randomised low-rank SVD, and affordable at the
    size of one layer.
    """
    u, s, vh = thin_svd(matrix)
    return u[:, :rank], s[:rank], vh[:rank, :]


def orthogonal_procrustes(basis: Tensor) -> Tensor:
    """The matrix with orthonormal columns (or rows) nearest to ``basis`` in Frobenius norm.

    Orthogonal Procrustes / polar factor: with ``basis`` = P Σ Qᵀ (thin SVD) the
    minimiser of ‖basis − X‖_F over XᵀX = I is X = P Qᵀ (the decorrelation step of
    TSV-M, Gargiulo et al. 2025). The map commutes with transposition, so the same call decorrelates a
    column basis U (m × r) and a row basis Vᵀ (r × n).
    """
    p, _, qh = thin_svd(basis)
    return p @ qh


def task_singular_vector_merge(matrices: Sequence[Tensor], rank: int) -> Tensor:
    """TSV-M for one layer: concatenate each task's top-``rank`` SVD, decorrelate, recombine.

    Gargiulo et al. 2025 (TSV-M): U = [U_1,r … U_T,r], Σ = diag(σ_1,r … σ_T,r),
    V = [V_1,r … V_T,r]; replace U and V by their nearest orthonormal bases and
    return U⊥ Σ V⊥ᵀ. The task spaces then no longer overlap, which is what the paper
    identifies as the source of interference.
    """
    parts = [truncated_svd(matrix, rank) for matrix in matrices]
    u = torch.cat([u for u, _, _ in parts], dim=1)
    s = torch.cat([s for _, s, _ in parts])
    vh = torch.cat([vh for _, _, vh in parts], dim=0)
    return (orthogonal_procrustes(u) * s) @ orthogonal_procrustes(vh)


def flatten_spectrum(matrix: Tensor) -> Tensor:
    """σ̄ U Vᵀ for ``matrix`` = U diag(σ) Vᵀ, with σ̄ the mean of all min(m, n) singular values.

    Iso-C (Marczak et al. 2025): Δ = σ̄ U Vᵀ with M = Σ_t τ_t = U Σ Vᵀ. An isotropic spectrum gives every
    direction of the merged update the same weight, so tasks whose directions carry small
    singular values in the sum are not drowned by the dominant, shared ones. The mean
    keeps the total spectral mass Σσ (the trace norm) unchanged.
    """
    u, s, vh = thin_svd(matrix)
    return (u * s.mean()) @ vh
