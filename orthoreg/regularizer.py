"""The OrthoReg penalty R(ΔW) = ‖G − I‖_F, G the smaller Gram matrix of ΔW.

Liu et al. (CVPR 2026, arXiv 2604.17078), Eq. (OrthoReg objective):
``L = L_task(θ0 + Δθ) + λ Σ_l R(ΔW_l)``. The paper's text squares the norm; the authors'
code does not. Both are offered (``squared``) because λ does not transfer between them:
their gradients differ by a factor ≈ 2‖G − I‖_F.

At ΔW = 0 the gradient of R is exactly zero (G is quadratic in ΔW), so the term never
disturbs the start of fine-tuning; for small ΔW it pushes singular values towards 1.

Two control forms separate what the penalty does to the *shape* of ΔW's spectrum from what
it does to its *size* (:data:`PENALTY_FORMS`: ``paper``, ``shape``, ``growth``), and
:meth:`OrthoReg.regime` reads where each ΔW sits (σ_max, median σ, R/√n, ‖ΔW‖_F).
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from orthoreg.errors import OrthoRegError

Reference = Mapping[str, Tensor] | Literal["zero"] | None


class NothingToPenalize(OrthoRegError, ValueError):
    """The selection (``include``/``exclude``/``matrices``) covers no weight of the model."""

#: parameter-name fragments that mark normalisation layers (excluded by default even when 2-D)
NORM_MARKERS = ("norm", ".bn", "bn.", "ln_", "layernorm", "batchnorm")


def as_matrix(weight: Tensor) -> Tensor:
    """View a weight as the matrix the penalty acts on: conv kernels become (out, in·kh·kw)."""
    if weight.ndim < 2:
        raise ValueError(f"OrthoReg acts on matrices; got a tensor of shape {tuple(weight.shape)}")
    return weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1)


def _gram(matrices: Tensor) -> Tensor:
    """G for a (…, m, n) stack, on the smaller side (size min(m, n))."""
    rows, cols = matrices.shape[-2:]
    return matrices.mT @ matrices if rows >= cols else matrices @ matrices.mT


def _gram_minus_identity(matrices: Tensor) -> Tensor:
    """G − I for a (…, m, n) stack, G on the smaller side (size min(m, n))."""
    gram = _gram(matrices)
    gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return gram


def _gram_blocks(size: int) -> int:
    """Column blocks for :func:`_symmetric_gram_minus_identity` (1 below 256: not worth it).

    Measured on ViT-B/32 shapes (12 matrices, one thread): a 768-wide Gram in 2 blocks took
    0.78×, in 4 blocks 0.70× the time of one product, 6 and 8 blocks no better (smaller,
    less efficient products); FLOPs fall as (b + 1)/2b.
    """
    return 1 if size < 256 else 2 if size < 512 else 4


def gram_flop_factor(size: int) -> float:
    """FLOPs of the fused Gram relative to a full 2·m·n·size product: (b + 1)/2b."""
    blocks = _gram_blocks(size)
    return (blocks + 1) / (2 * blocks)


def _symmetric_gram(matrices: Tensor) -> Tensor:
    """G like :func:`_gram`, computing only the blocks on and above the diagonal.

    G is symmetric, so with the smaller side split into b blocks the b(b − 1)/2 blocks below
    the diagonal are transposed copies: (b + 1)/2b of the FLOPs (5/8 at b = 4), the forward
    half of a BLAS ``syrk``, which torch does not expose.
    """
    rows, cols = matrices.shape[-2:]
    tall = rows >= cols
    size = cols if tall else rows
    blocks = _gram_blocks(size)
    if blocks == 1:
        return _gram(matrices)
    bounds = [size * index // blocks for index in range(blocks + 1)]
    parts = [
        matrices[..., start:stop] if tall else matrices[..., start:stop, :]
        for start, stop in itertools.pairwise(bounds)
    ]
    gram = matrices.new_empty((*matrices.shape[:-2], size, size))
    for i, left in enumerate(parts):
        rows_i = slice(bounds[i], bounds[i + 1])
        for j in range(i, blocks):
            block = left.mT @ parts[j] if tall else left @ parts[j].mT
            cols_j = slice(bounds[j], bounds[j + 1])
            gram[..., rows_i, cols_j] = block
            if j != i:
                gram[..., cols_j, rows_i] = block.mT
    return gram


def _symmetric_gram_minus_identity(matrices: Tensor) -> Tensor:
    """G − I from :func:`_symmetric_gram` (the upper blocks only)."""
    gram = _symmetric_gram(matrices)
    gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return gram


def _finish(squared_norm: Tensor, squared: bool) -> Tensor:
    return squared_norm if squared else squared_norm.clamp_min(0.0).sqrt()


def mean_floor(dtype: torch.dtype) -> float:
    """The least ḡ = tr G / n the ``shape`` form divides by: √(smallest normal) of ``dtype``.

    1.1e-19 in float32 and bfloat16 (an RMS singular value of 3e-10), 1.5e-154 in float64:
    far below any update training produces, yet 1/ḡ and the gradient, whose size grows as
    1/‖ΔW‖ (R_shape is homogeneous of degree 0), stay finite in ``dtype``.
    """
    return math.sqrt(torch.finfo(dtype).tiny)


def _shape_mean(trace: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(ḡ clamped below by :func:`mean_floor`, tr G > 0) — ḡ is 1 where tr G = 0, so that
    nothing downstream divides by zero; those matrices get R = 0 and ∇R = 0."""
    valid = trace > 0
    mean = torch.where(valid, (trace / n).clamp_min(mean_floor(trace.dtype)), 1.0)
    return mean, valid


def _paper_dense(matrices: Tensor, squared: bool) -> Tensor:
    residual = _gram_minus_identity(matrices)
    if squared:
        return residual.square().sum(dim=(-2, -1))
    return torch.linalg.matrix_norm(residual, ord="fro")


def _shape_dense(matrices: Tensor, squared: bool) -> Tensor:
    gram = _gram(matrices)
    n = gram.shape[-1]
    mean, valid = _shape_mean(gram.diagonal(dim1=-2, dim2=-1).sum(-1), n)
    identity = torch.eye(n, dtype=gram.dtype, device=gram.device)
    residual = gram / mean[..., None, None] - identity
    value = (residual.square().sum(dim=(-2, -1)) if squared
             else torch.linalg.matrix_norm(residual, ord="fro"))
    return torch.where(valid, value, 0.0)


def _growth_dense(matrices: Tensor, squared: bool) -> Tensor:
    n = min(matrices.shape[-2:])
    return _growth_value(matrices.square().sum(dim=(-2, -1)), n, squared)


def _growth_value(trace: Tensor, n: int, squared: bool) -> Tensor:
    """n − 2‖ΔW‖²_F (squared) or √n − ‖ΔW‖²_F/√n: R_paper to first order in tr G = ‖ΔW‖²_F."""
    return n - 2.0 * trace if squared else math.sqrt(n) - trace / math.sqrt(n)


def orthoreg_penalty(delta: Tensor, squared: bool = False, form: str = "paper") -> Tensor:
    """R(ΔW) = ‖G − I‖_F (``squared=True``: ‖G − I‖²_F) for one weight update.

    ``form`` picks another penalty of the same update (:data:`PENALTY_FORMS`).
    """
    if form != "paper":
        return penalty_form(form).dense(as_matrix(delta), squared)
    residual = _gram_minus_identity(as_matrix(delta))
    if squared:
        return residual.square().sum()
    # matrix_norm's backward is defined (zero) at a zero residual, unlike sqrt(sum(x²)).
    return torch.linalg.matrix_norm(residual, ord="fro")


def batched_penalty(deltas: Tensor, squared: bool = False, form: str = "paper") -> Tensor:
    """R for a (B, m, n) stack of equal-shape updates with one batched matmul; returns (B,)."""
    return penalty_form(form).dense(deltas, squared)


def lowrank_penalty(A: Tensor, B: Tensor, scale: float, squared: bool = False,
                    form: str = "paper") -> Tensor:
    """R(s·B·A) exactly, from r×r matrices only (never the dense ΔW or its Gram).

    With M = (BᵀB)(AAᵀ) (r×r), the nonzero spectrum of G equals that of s²M, so
    tr G = s²·tr M, tr G² = s⁴·tr M², and ‖G − I‖²_F = tr G² − 2 tr G + n with
    n = min(rows, cols) of ΔW. Because rank ΔW ≤ r, R ≥ √(n − r) whenever r < n.
    The other forms follow from the same traces (see :data:`PENALTY_FORMS`).
    """
    A2 = A.reshape(A.shape[0], -1)  # (r, in)  — conv LoRA-A kernels flatten to (r, in·k·k)
    B2 = B.reshape(B.shape[0], -1)  # (out, r) — conv LoRA-B is a 1×1 kernel
    if A2.shape[0] != B2.shape[1]:
        raise ValueError(
            f"LoRA factors do not compose: A is {tuple(A.shape)} (rank {A2.shape[0]}), "
            f"B is {tuple(B.shape)} (rank {B2.shape[1]})"
        )
    n = min(B2.shape[0], A2.shape[1])
    m = (B2.mT @ B2) @ (A2 @ A2.mT)
    return penalty_form(form).lowrank(m, float(scale) ** 2, n, squared)


def _paper_lowrank(m: Tensor, s2: float, n: int, squared: bool) -> Tensor:
    tr_g = s2 * torch.diagonal(m).sum()
    tr_g2 = (s2 * s2) * (m * m.mT).sum()
    return _finish(tr_g2 - 2.0 * tr_g + n, squared)


def _shape_lowrank(m: Tensor, s2: float, n: int, squared: bool) -> Tensor:
    """‖G/ḡ − I‖_F: the paper form's traces of c·M, c = s²/ḡ (G/ḡ has the spectrum of c·M).

    Unclamped, c·M = n·M/tr M: no s, no tiny σ⁴ to underflow. With rank r < n the
    value is at least √(n(n − r)/r) (tr G² ≥ (tr G)²/r), reached when the r nonzero σ are
    equal. tr M = 0 (a fresh LoRA, B = 0) gives 0 through a mask whose other branch stays
    finite (ḡ clamped), so the gradient there is exactly 0. The plain form's square root
    is taken of at least the smallest normal number: its derivative stays finite where the
    r = n nonzero σ are exactly equal (R ≈ 1e-19 there instead of 0).
    """
    tr_m = torch.diagonal(m).sum()
    mean = (s2 * tr_m / n).clamp_min(mean_floor(m.dtype))
    scaled = m * (s2 / mean)
    squared_norm = (scaled * scaled.mT).sum() - 2.0 * torch.diagonal(scaled).sum() + n
    value = (squared_norm.clamp_min(0.0) if squared
             else squared_norm.clamp_min(torch.finfo(m.dtype).tiny).sqrt())
    return value * (tr_m > 0)


def _growth_lowrank(m: Tensor, s2: float, n: int, squared: bool) -> Tensor:
    return _growth_value(s2 * torch.diagonal(m).sum(), n, squared)


def rademacher(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Probe vectors with independent ±1 entries, so that E[z zᵀ] = I (drawn on the CPU)."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return signs.to(device, dtype) * 2 - 1


def hutchinson_penalty(
    delta: Tensor,
    probes: int,
    squared: bool = True,
    generator: torch.Generator | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """Unbiased estimate of ‖G − I‖²_F = E_z‖(G − I)z‖² with Rademacher z, O(k·m·n).

    Unbiased only for the squared form; with ``squared=False`` it returns the square root of
    the estimate, which by Jensen underestimates R (see :class:`OrthoReg` for the size of
    the bias). ``z`` (min(m, n) × k) replaces the random probes, e.g. to compare estimators.
    """
    matrix = as_matrix(delta)
    rows, cols = matrix.shape
    n = min(rows, cols)
    if z is None:
        z = rademacher((n, probes), generator, matrix.device, matrix.dtype)
    probes = z.shape[-1]
    if rows >= cols:  # G = ΔᵀΔ (n = cols)
        gz = matrix.mT @ (matrix @ z)
    else:  # G = ΔΔᵀ (n = rows)
        gz = matrix @ (matrix.mT @ z)
    estimate = (gz - z).square().sum() / probes
    return _finish(estimate, squared)


# ----------------------------------------------------------------------------- fused groups
class _Workspace:
    """One reusable buffer per (device, dtype) into which a group's ΔW stack is written.

    A fresh multi-megabyte tensor costs page faults on the CPU that take as long as the
    subtraction filling it (measured: 113 MB took 180 ms fresh against 45 ms reused on the
    2-core machine); reusing one buffer, sized to the largest group, removes that cost.
    On CUDA the caching allocator would keep the same block reserved anyway.
    """

    def __init__(self, capacity: Mapping[tuple[torch.device, torch.dtype], int]) -> None:
        self.capacity = dict(capacity)
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        key = (like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            size = max(numel, self.capacity.get(key, 0))
            buffer = self._buffers[key] = torch.empty(size, device=like.device, dtype=like.dtype)
        return buffer[:numel].view(shape)


@dataclass(frozen=True)
class _GroupPlan:
    """How a group's ΔW stack is (re)built into the workspace: W − W0, matrix by matrix.

    One subtraction per matrix straight into the workspace reads W and θ0 and writes ΔW
    once (3 passes over the bytes). Stacking the weights and subtracting a stacked θ0 takes
    two ops but 5 passes; it won only on the shared box under heavy load (fewer parallel
    regions to schedule). Quiet 2-core machine, ViT-B/32, Hutchinson k = 8 value and
    gradient: 106 ms per matrix against 115 ms stacked (2 threads), 173 vs 182 (one thread);
    the exact penalty, compute-bound, is the same either way.
    """

    references: tuple[Tensor, ...] | None  # θ0 matrices, or None: the weights are ΔW
    workspace: _Workspace
    squared: bool
    form: str = "paper"  # a key of PENALTY_FORMS

    def deltas(self, weights: Sequence[Tensor]) -> Tensor:
        first = as_matrix(weights[0])
        if self.references is not None and self.references[0].device != first.device:
            raise RuntimeError(
                f"OrthoReg's θ0 is on {self.references[0].device} but the weights are on "
                f"{first.device}: build the regularizer after moving the model"
            )
        out = self.workspace.take((len(weights), *first.shape), first)
        if self.references is None:
            return torch.stack([as_matrix(weight) for weight in weights], out=out)
        for index, weight in enumerate(weights):
            torch.sub(as_matrix(weight), self.references[index], out=out[index])
        return out


def _no_autocast(tensor: Tensor) -> contextlib.AbstractContextManager[None]:
    """G − I is small next to I: the Gram must not run in bf16/fp16 under autocast."""
    return torch.autocast(tensor.device.type, enabled=False)


def _as_weight_grads(
    grads: Tensor, weights: Sequence[Tensor], needs: Sequence[bool]
) -> tuple[Tensor | None, ...]:
    return tuple(
        grad.view(weight.shape) if need else None
        for grad, weight, need in zip(grads.unbind(0), weights, needs)
    )


def _exact_factors(deltas: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient of ‖G − I‖²_F/4 as one product per matrix: Δ(G − I) tall, (G − I)Δ wide."""
    return (deltas, residual) if deltas.shape[-2] >= deltas.shape[-1] else (residual, deltas)


def _exact_coeff(value: Tensor, upstream: Tensor | float, squared: bool) -> Tensor:
    """Per-matrix factor on (G − I) in the gradient: 4·g squared, 2·g/R unsquared (0 at R = 0)."""
    if squared:
        return (4.0 * upstream) * torch.ones_like(value)
    return torch.where(value > 0, 2.0 * upstream / value, torch.zeros_like(value))


@dataclass(frozen=True)
class _GramKernel:
    """A Gram form for the fused path: R of a (B, m, n) stack and its gradient's kernel.

    ``forward(deltas, squared) → (value, K, aux)``: per-matrix R (B,), a symmetric (B, n, n)
    kernel K and a per-matrix tensor ``aux``, such that the gradient of ``upstream``·R is
    ``coeff(value, aux, upstream, squared)``·ΔK (tall Δ; KΔ wide): one product per matrix,
    as for the paper form. K may be scaled in place (it is the only n×n buffer).
    """

    forward: Callable[[Tensor, bool], tuple[Tensor, Tensor, Tensor]]
    coeff: Callable[[Tensor, Tensor, Tensor | float, bool], Tensor]


def _paper_kernel(deltas: Tensor, squared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """K = G − I: ∇‖G − I‖²_F = 4Δ(G − I), ∇‖G − I‖_F = 2Δ(G − I)/‖G − I‖_F."""
    residual = _symmetric_gram_minus_identity(deltas)
    squared_norm = residual.square().sum(dim=(-2, -1))
    value = squared_norm if squared else squared_norm.sqrt()
    return value, residual, value


def _paper_coeff(value: Tensor, aux: Tensor, upstream: Tensor | float, squared: bool) -> Tensor:
    return _exact_coeff(value, upstream, squared)


def _shape_kernel(deltas: Tensor, squared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """H = G/ḡ − I, f = ‖H‖²_F; K = H − (f/n)·I; aux = 1/ḡ (squared) or 1/(ḡR) (plain).

    With ḡ = tr G/n, ∂f/∂G = (2/ḡ)(H − (f/n)·I) (the trace term is the derivative through ḡ;
    it vanishes where ḡ is clamped, ḡ being constant there), so ∇‖H‖²_F = (4/ḡ)·ΔK and
    ∇‖H‖_F = (2/(ḡR))·ΔK. tr K = 0 unclamped: the gradient is orthogonal to ΔW. Matrices
    with tr G = 0 get R = 0 and aux = 0 (∇R = 0). No overflow: ḡ ≥ :func:`mean_floor`, and a
    nonzero R of a float32 matrix is ≳ 1e-8 (it is 0 exactly or above rounding), so 1/(ḡR)
    stays ≲ 1e27. Masks multiply rather than ``where`` on the hot path (fewer small ops).
    """
    gram = _symmetric_gram(deltas)
    n = gram.shape[-1]
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    trace = diagonal.sum(-1)
    least_trace = n * mean_floor(trace.dtype)  # ḡ ≥ floor ⟺ tr G ≥ n·floor
    inverse_mean = n / trace.clamp_min(least_trace)
    gram.mul_(inverse_mean[:, None, None])
    diagonal.sub_(1.0)
    squared_norm = gram.square().sum(dim=(-2, -1))
    value = (squared_norm if squared else squared_norm.sqrt()) * (trace > 0)
    # the derivative through ḡ: (f/n)·I, only where ḡ is not clamped (clamp_min's mask)
    diagonal.sub_((squared_norm / n).mul_(trace >= least_trace)[:, None])
    if squared:
        return value, gram, inverse_mean * (trace > 0)
    return value, gram, torch.where(value > 0, inverse_mean / value, torch.zeros_like(value))


def _shape_coeff(value: Tensor, aux: Tensor, upstream: Tensor | float, squared: bool) -> Tensor:
    return ((4.0 if squared else 2.0) * upstream) * aux


_GRAM_KERNELS: dict[str, _GramKernel] = {
    "paper": _GramKernel(_paper_kernel, _paper_coeff),
    "shape": _GramKernel(_shape_kernel, _shape_coeff),
}


class _ExactGroupPenalty(torch.autograd.Function):
    """R of B equal-shape matrices: one batched Gram forward, one batched product backward.

    Autograd through ΔᵀΔ spends two m·n·n products in the backward, one per factor; G is
    symmetric, so the gradient is the single product ∇‖G − I‖²_F = 4Δ(G − I) (tall Δ;
    4(G − I)Δ for wide), and ∇‖G − I‖_F = that / 2‖G − I‖_F (zero where G = I, as
    ``matrix_norm``'s backward). With the Gram's upper blocks only
    (:func:`_symmetric_gram_minus_identity`) the penalty costs (2 + (b + 1)/b)·m·n·min(m, n)
    FLOPs (3.25 at b = 4) instead of autograd's 6.
    Only the n×n kernel (min(m, n)² per matrix) is saved; ΔW is rebuilt in the backward into
    the shared workspace, so the penalty's memory never exceeds one group's ΔW and gradient.
    Every Gram form (:class:`_GramKernel`: ``paper``, ``shape``) runs through this one path.
    First-order only (``once_differentiable``); :func:`batched_penalty` is the reference.
    """

    @staticmethod
    def forward(ctx: Any, plan: _GroupPlan, *weights: Tensor) -> Tensor:
        with _no_autocast(weights[0]):
            value, kernel, aux = _GRAM_KERNELS[plan.form].forward(plan.deltas(weights),
                                                                  plan.squared)
        ctx.plan = plan
        ctx.save_for_backward(kernel, value, aux, *weights)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        kernel, value, aux, *weights = ctx.saved_tensors
        if not any(ctx.needs_input_grad[1:]):
            return (None,) * (1 + len(weights))
        plan = ctx.plan
        coeff = _GRAM_KERNELS[plan.form].coeff(value, aux, grad_value, plan.squared)
        with _no_autocast(kernel):
            deltas = plan.deltas(weights)
            left, right = _exact_factors(deltas, kernel * coeff[:, None, None])
            grads = torch.bmm(left, right)
        return (None, *_as_weight_grads(grads, weights, ctx.needs_input_grad[1:]))


def _squared_norms(deltas: Tensor) -> Tensor:
    """‖ΔW_i‖²_F of a (B, m, n) stack as B dot products (no full-size temporary)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    return torch.bmm(flat[:, None, :], flat[:, :, None]).view(-1)


def _growth_coeff(upstream: Tensor | float, n: int, squared: bool) -> Tensor | float:
    """∇ of the growth form = coeff·ΔW: −4 (squared) or −2/√n (plain), times ``upstream``."""
    return -4.0 * upstream if squared else (-2.0 / math.sqrt(n)) * upstream


class _GrowthGroupPenalty(torch.autograd.Function):
    """The ``growth`` form of B equal-shape matrices: R from ‖ΔW‖²_F, ∇R = c·ΔW, no Gram.

    O(m·n): ΔW is built, reduced to B dot products, and rebuilt for the gradient.
    """

    @staticmethod
    def forward(ctx: Any, plan: _GroupPlan, *weights: Tensor) -> Tensor:
        with _no_autocast(weights[0]):
            deltas = plan.deltas(weights)
            value = _growth_value(_squared_norms(deltas), min(deltas.shape[-2:]), plan.squared)
        ctx.plan = plan
        ctx.save_for_backward(*weights)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        weights = ctx.saved_tensors
        if not any(ctx.needs_input_grad[1:]):
            return (None,) * (1 + len(weights))
        plan = ctx.plan
        deltas = plan.deltas(weights)
        coeff = _growth_coeff(grad_value, min(deltas.shape[-2:]), plan.squared)
        grads = deltas * coeff[:, None, None]
        return (None, *_as_weight_grads(grads, weights, ctx.needs_input_grad[1:]))


def _fast_probe_layout(z: Tensor) -> Tensor:
    """The same probes stored k-major: ``Δ @ z`` with z (B, n, k) row-major ran 2× slower
    (23 vs 12 ms, 12 × 3072×768, one thread) than with z held as the transpose of a
    contiguous (B, k, n) — a copy of n·k numbers per matrix."""
    return z.mT.contiguous().mT


def _hutchinson_forward(deltas: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u, y and ‖y‖²/k for a (B, m, n) stack; see :class:`_HutchinsonGroupPenalty`."""
    if deltas.shape[-2] >= deltas.shape[-1]:  # z: (B, n, k)
        u = torch.bmm(deltas, _fast_probe_layout(z))  # Δz, (B, m, k)
        y = torch.bmm(u.mT, deltas).sub_(z.mT)  # ((G − I)z)ᵀ, (B, k, n)
    else:  # z: (B, m, k)
        u = torch.bmm(z.mT, deltas)  # (Δᵀz)ᵀ, (B, k, n)
        y = torch.bmm(deltas, u.mT).sub_(z)  # (G − I)z, (B, m, k)
    return u, y, y.square().sum(dim=(-2, -1)) / z.shape[-1]


def _hutchinson_factors(
    deltas: Tensor, u: Tensor, y: Tensor, z: Tensor, coeff: Tensor
) -> tuple[Tensor, Tensor]:
    """The estimate's gradient (per matrix, times ``coeff``) as one rank-2k product."""
    coeff = coeff[:, None, None]
    if deltas.shape[-2] >= deltas.shape[-1]:  # u yᵀ + (Δy) zᵀ
        left = torch.cat([u, torch.bmm(deltas, y.mT)], dim=-1).mul_(coeff)
        return left, torch.cat([y, z.mT], dim=-2)
    # transposed: y uᵀ + z (Δᵀy)ᵀ
    left = torch.cat([y, z], dim=-1).mul_(coeff)
    return left, torch.cat([u, torch.bmm(y.mT, deltas)], dim=-2)


def _hutchinson_coeff(value: Tensor, upstream: Tensor | float, probes: int, squared: bool) -> Tensor:
    if squared:
        return (upstream * (2.0 / probes)) * torch.ones_like(value)
    # d√e = de / 2√e
    return torch.where(value > 0, upstream / (probes * value), torch.zeros_like(value))


class _HutchinsonGroupPenalty(torch.autograd.Function):
    """Hutchinson's ‖(G − I)z‖²/k for B equal-shape matrices with batched products.

    Tall Δ (G = ΔᵀΔ, z ∈ ℝ^{n×k}): u = Δz, y = (G − I)z, estimate ‖y‖²/k, gradient
    (2/k)(u yᵀ + (Δy) zᵀ); wide Δ is the transpose of that. Every thin product keeps Δ
    untransposed and the k-column side small (``uᵀΔ`` rather than ``Δᵀu``): MKL runs a
    transposed batched operand 2–5× slower (measured, ViT-B/32 shapes, one thread). Three
    thin passes over Δ and one rank-2k product for the gradient, against autograd's four.
    """

    @staticmethod
    def forward(ctx: Any, plan: _GroupPlan, z: Tensor, *weights: Tensor) -> Tensor:
        with _no_autocast(weights[0]):
            u, y, estimate = _hutchinson_forward(plan.deltas(weights), z)
        value = estimate if plan.squared else estimate.sqrt()
        ctx.plan = plan
        ctx.save_for_backward(u, y, z, value, *weights)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        u, y, z, value, *weights = ctx.saved_tensors
        if not any(ctx.needs_input_grad[2:]):
            return (None,) * (2 + len(weights))
        coeff = _hutchinson_coeff(value, grad_value, z.shape[-1], ctx.plan.squared)
        with _no_autocast(u):
            left, right = _hutchinson_factors(ctx.plan.deltas(weights), u, y, z, coeff)
            grads = torch.bmm(left, right)
        return (None, None, *_as_weight_grads(grads, weights, ctx.needs_input_grad[2:]))


def _add_products_to_grads(weights: Sequence[Tensor], left: Tensor, right: Tensor) -> None:
    """``weight.grad += left[i] @ right[i]`` in place (``addmm_``), never a fresh full-size
    gradient that autograd would then add: on the CPU a fresh 113 MB tensor costs as much in
    page faults as the product itself (58 vs 10 ms for 12 × 3072×768, one thread)."""
    for weight, a, b in zip(weights, left.unbind(0), right.unbind(0)):
        if not weight.requires_grad:
            continue
        grad = weight.grad
        if grad is None:
            weight.grad = (a @ b).view(weight.shape).to(weight.dtype)
        elif grad.is_contiguous() and grad.dtype == a.dtype:
            grad.view(a.shape[0], b.shape[1]).addmm_(a, b)
        else:
            grad.add_((a @ b).view(weight.shape))


def _gram_accumulate(plan: _GroupPlan, weights: Sequence[Tensor], scale: float) -> Tensor:
    """A Gram form's value, and ``scale``·∇R added into ``.grad`` (one ΔW, one product each)."""
    kernel = _GRAM_KERNELS[plan.form]
    with torch.no_grad(), _no_autocast(weights[0]):
        deltas = plan.deltas(weights)
        value, residual, aux = kernel.forward(deltas, plan.squared)
        residual.mul_(kernel.coeff(value, aux, scale, plan.squared)[:, None, None])
        _add_products_to_grads(weights, *_exact_factors(deltas, residual))
    return value


def _growth_accumulate(plan: _GroupPlan, weights: Sequence[Tensor], scale: float) -> Tensor:
    """The growth form's value, and ``scale``·c·ΔW added into ``.grad`` in place."""
    with torch.no_grad(), _no_autocast(weights[0]):
        deltas = plan.deltas(weights)
        n = min(deltas.shape[-2:])
        value = _growth_value(_squared_norms(deltas), n, plan.squared)
        coeff = float(_growth_coeff(scale, n, plan.squared))
        for weight, delta in zip(weights, deltas.unbind(0)):
            if not weight.requires_grad:
                continue
            if weight.grad is None:
                weight.grad = (coeff * delta).view(weight.shape).to(weight.dtype)
            else:
                weight.grad.add_(delta.view(weight.shape), alpha=coeff)
    return value


def _gram_penalty(plan: _GroupPlan, weights: Sequence[Tensor]) -> Tensor:
    return _ExactGroupPenalty.apply(plan, *weights)


def _growth_penalty(plan: _GroupPlan, weights: Sequence[Tensor]) -> Tensor:
    return _GrowthGroupPenalty.apply(plan, *weights)


def _exact_accumulate(reg: OrthoReg, plan: _GroupPlan, weights: Sequence[Tensor],
                      scale: float) -> Tensor:
    return penalty_form(plan.form).accumulate(plan, weights, scale)


def _hutchinson_accumulate(reg: OrthoReg, plan: _GroupPlan, weights: Sequence[Tensor],
                           scale: float) -> Tensor:
    z = _probes(reg, weights)
    with torch.no_grad(), _no_autocast(weights[0]):
        deltas = plan.deltas(weights)
        u, y, estimate = _hutchinson_forward(deltas, z)
        value = estimate if plan.squared else estimate.sqrt()
        coeff = _hutchinson_coeff(value, scale, z.shape[-1], plan.squared)
        _add_products_to_grads(weights, *_hutchinson_factors(deltas, u, y, z, coeff))
    return value


def fused_penalty(
    weights: Sequence[Tensor],
    references: Sequence[Tensor] | None = None,
    squared: bool = False,
    form: str = "paper",
) -> Tensor:
    """R(W_i − W0_i) for equal-shape weights as :class:`OrthoReg` computes it; returns (B,).

    ``references=None`` means the weights are the updates. Values equal
    :func:`orthoreg_penalty` per matrix; gradients too, at ≈ 3.25 instead of 6 m·n·min(m, n)
    FLOPs for the Gram forms (``paper``, ``shape``); ``growth`` needs no Gram (O(m·n)).
    """
    plan = _plan(weights, references, squared, form)
    return penalty_form(form).fused(plan, weights)


def fused_hutchinson(
    weights: Sequence[Tensor],
    z: Tensor,
    references: Sequence[Tensor] | None = None,
    squared: bool = True,
) -> Tensor:
    """Hutchinson estimates for equal-shape weights with probes ``z`` (B, min(m, n), k)."""
    plan = _plan(weights, references, squared)
    return _HutchinsonGroupPenalty.apply(plan, z, *weights)


def _plan(
    weights: Sequence[Tensor], references: Sequence[Tensor] | None, squared: bool,
    form: str = "paper",
) -> _GroupPlan:
    if not weights:
        raise ValueError("no weights given")
    refs = None if references is None else tuple(as_matrix(r.detach()) for r in references)
    if refs is not None and len(refs) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(refs)} references")
    return _GroupPlan(refs, _Workspace({}), squared, penalty_form(form).name)


@dataclass(frozen=True)
class LowRankTerm:
    """One LoRA adapter seen by the penalty: ΔW = scale · B · A."""

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float


def _is_norm(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in NORM_MARKERS)


def lora_terms(model: nn.Module) -> list[LowRankTerm]:
    """Find PEFT-style LoRA adapters (modules with ``lora_A``/``lora_B``/``scaling``)."""
    terms = []
    for module_name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        scaling = getattr(module, "scaling", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        active = getattr(module, "active_adapters", None) or list(lora_a.keys())
        for adapter in active:
            if adapter not in lora_a:
                continue
            a, b = lora_a[adapter].weight, lora_b[adapter].weight
            if not (a.requires_grad or b.requires_grad):
                continue
            scale = scaling[adapter] if isinstance(scaling, Mapping) else 1.0
            terms.append(LowRankTerm(f"{module_name}[{adapter}]", a, b, float(scale)))
    return terms


#: which weights count as matrices (``OrthoReg(matrices=...)``), by the weight's ``ndim``
MATRIX_RULES: dict[str, Callable[[int], bool]] = {
    # every ≥2-D weight; conv kernels are reshaped to (out, in·kh·kw) (DESIGN §1)
    "ndim>=2": lambda ndim: ndim >= 2,
    # exactly 2-D weights, the authors' rule: a ViT's 4-D patch-embedding conv is not covered
    "2d": lambda ndim: ndim == 2,
}


def matrix_rule(matrices: str) -> Callable[[int], bool]:
    """The ``matrices=`` rule by name; an unknown name is a one-line error listing the known."""
    try:
        return MATRIX_RULES[matrices]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown matrices={matrices!r}; choose from {sorted(MATRIX_RULES)}"
        ) from None


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    matrices: str = "ndim>=2",
) -> list[tuple[str, nn.Parameter]]:
    """The matrices the penalty covers: trainable, ≥ 2-D (``matrices="2d"``: exactly 2-D),
    not normalisation, by name globs."""
    is_matrix = matrix_rule(matrices)
    skipped = set(skip)
    chosen = []
    for name, param in model.named_parameters():
        if name in skipped or not param.requires_grad or not is_matrix(param.ndim):
            continue
        if include is not None:
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
                continue
        elif _is_norm(name):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        chosen.append((name, param))
    return chosen


class _Group:
    """Equal-shape matrices whose penalty is computed with batched products."""

    def __init__(
        self,
        names: list[str],
        params: list[Tensor],
        references: tuple[Tensor, ...] | None,
        owned: Tensor | None = None,
    ) -> None:
        self.names = names
        self.params = params
        # θ0 matrix per member (None: the parameters are the updates); borrowed tensors or
        # views into ``reference``
        self.references = references
        # the (B, m, n) stack of θ0 this OrthoReg captured itself; None when borrowed
        self.reference = owned


def _storage_ptr(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class OrthoReg:
    """λ-free penalty Σ_l R(ΔW_l) over a model's selected matrices; call it every step.

    θ0 is held once, on the parameters' device, and never copied per step: a ``reference``
    mapping whose tensors already sit on the weights' device and dtype and do not share
    memory with the live weights is *borrowed* (the paradigm's θ0 buffers are the only
    copy; do not modify them), anything else is stacked into a copy once.
    ``reference=None`` captures θ0 from the weights now; ``reference="zero"`` says the
    parameters *are* the updates (the tangent paradigm stores Δ directly). Each distinct
    shape costs one batched Gram (``torch.bmm``, faster than a Python loop of ``mm`` on CPU)
    and one batched product in the backward, with ΔW written into one reused workspace (the
    largest group's size). LoRA adapters found in the model use the exact low-rank form.

    ``estimator="hutchinson"`` replaces each Gram by ``probes`` Rademacher probes,
    O(k·m·n) instead of O(m·n·min(m, n)): ‖G − I‖²_F = E_z‖(G − I)z‖², so with
    ``squared=True`` penalty and gradient are unbiased. With ``squared=False`` the square
    root of the estimate is biased low (Jensen): the per-probe variance of the estimate is at
    most 2‖(G − I)²‖²_F ≤ 2‖G − I‖⁴_F, so to second order the relative bias is at most
    1/(4k) (≈ 3 % at k = 8), and the gradient's scale 1/2√estimate is noisy. We allow it
    because the authors' λ values are for the unsquared form; prefer ``squared=True`` with
    this estimator when choosing λ afresh. LoRA adapters always use the exact low-rank form.
    The estimator supports the ``paper`` form only (:attr:`Estimator.forms`).

    ``form`` picks the penalty per matrix (:data:`PENALTY_FORMS`): ``paper`` (default, the
    method), ``shape`` (spectrum shape only, scale-invariant) or ``growth`` (magnitude only);
    each has its own λ scale. ``matrices`` picks which weights count (:data:`MATRIX_RULES`):
    ``"ndim>=2"`` (default; conv kernels reshaped) or ``"2d"`` (the authors' rule: exactly
    2-D weights, so a ViT's patch-embedding conv is not covered); LoRA adapters count by
    the dimension of the weight they adapt.
    """

    def __init__(
        self,
        model: nn.Module,
        reference: Reference = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        squared: bool = False,
        estimator: Literal["exact", "hutchinson"] = "exact",
        probes: int = 8,
        generator: torch.Generator | None = None,
        form: str = "paper",
        matrices: str = "ndim>=2",
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
        penalty_form(form)  # an unknown form fails here, listing the known ones
        if form not in ESTIMATORS[estimator].forms:
            raise ValueError(f"estimator={estimator!r} does not support form={form!r} "
                             f"(it supports {sorted(ESTIMATORS[estimator].forms)})")
        is_matrix = matrix_rule(matrices)
        if probes < 1:
            raise ValueError(f"probes must be ≥ 1, got {probes}")
        self.squared = squared
        self.estimator = estimator
        self.probes = probes
        self.generator = generator
        self.form = form
        self.matrices = matrices
        adapters = lora_terms(model)
        lora_names = {
            name for name, p in model.named_parameters()
            if any(p is t.A or p is t.B for t in adapters)
        }
        self.lowrank = [t for t in adapters if is_matrix(max(t.A.ndim, t.B.ndim))]
        selected = select_parameters(model, include, exclude, skip=lora_names, matrices=matrices)
        if not selected and not self.lowrank:
            hint = ("; matrices='2d' covers exactly 2-D weights, and conv kernels are 4-D"
                    if matrices == "2d" else "")
            raise NothingToPenalize(
                f"OrthoReg selected no parameters: no trainable weight of "
                f"{type(model).__name__} is a matrix under matrices={matrices!r} and matches "
                f"include={include!r} exclude={exclude!r}{hint}"
            )
        self.names = [name for name, _ in selected]
        live = {_storage_ptr(p) for p in model.parameters()}
        self._groups = self._build_groups(selected, reference, live)
        capacity: dict[tuple[torch.device, torch.dtype], int] = {}
        for group in self._groups:
            key = (group.params[0].device, group.params[0].dtype)
            size = len(group.params) * group.params[0].numel()
            capacity[key] = max(capacity.get(key, 0), size)
        self._workspace = _Workspace(capacity)

    def _build_groups(
        self, selected: list[tuple[str, nn.Parameter]], reference: Reference, live: set[int]
    ) -> list[_Group]:
        if isinstance(reference, str) and reference != "zero":
            raise ValueError(f"reference must be a mapping, 'zero' or None, got {reference!r}")
        by_shape: dict[tuple[int | str, ...], list[tuple[str, nn.Parameter]]] = {}
        for name, param in selected:
            key = (*tuple(as_matrix(param).shape), str(param.device), str(param.dtype))
            by_shape.setdefault(key, []).append((name, param))
        groups = []
        for members in by_shape.values():
            names = [name for name, _ in members]
            params = [param for _, param in members]
            if reference == "zero":
                groups.append(_Group(names, params, None))
                continue
            refs = []
            for name, param in members:
                ref = param if reference is None else reference.get(name)
                if ref is None:
                    raise KeyError(f"reference has no tensor for parameter {name!r}")
                if tuple(ref.shape) != tuple(param.shape):
                    raise ValueError(
                        f"reference for {name!r} has shape {tuple(ref.shape)}, "
                        f"parameter has {tuple(param.shape)}"
                    )
                refs.append(ref.detach())
            borrow = reference is not None and all(
                ref.device == param.device and ref.dtype == param.dtype
                and not ref.requires_grad and _storage_ptr(ref) not in live
                for ref, param in zip(refs, params)
            )
            if borrow:
                groups.append(_Group(names, params, tuple(as_matrix(ref) for ref in refs)))
            else:  # one stacked copy, made now, never aliasing the live weights
                stacked = torch.stack(
                    [as_matrix(ref).to(param.device, param.dtype) for ref, param in zip(refs, params)]
                )
                groups.append(_Group(names, params, tuple(stacked.unbind(0)), stacked))
        return groups

    def _params(self, group: _Group, model: nn.Module | None) -> list[Tensor]:
        if model is None:
            return group.params
        named = dict(model.named_parameters())
        missing = [name for name in group.names if name not in named]
        if missing:
            raise KeyError(f"model has no parameter {missing[0]!r} that this OrthoReg covers")
        return [named[name] for name in group.names]

    def _plan(self, group: _Group) -> _GroupPlan:
        return _GroupPlan(group.references, self._workspace, self.squared, self.form)

    def _lowrank_penalty(self, term: LowRankTerm) -> Tensor:
        return lowrank_penalty(term.A, term.B, term.scale, self.squared, self.form)

    def _group_penalty(self, group: _Group, params: Sequence[Tensor]) -> Tensor:
        return ESTIMATORS[self.estimator].penalty(self, self._plan(group), params)

    def per_layer(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """R(ΔW_l) for each covered matrix and LoRA adapter (for logging and diagnostics)."""
        values: dict[str, Tensor] = {}
        for group in self._groups:
            penalties = self._group_penalty(group, self._params(group, model))
            values.update(zip(group.names, penalties.unbind(0)))
        for term in self.lowrank:
            values[term.name] = self._lowrank_penalty(term)
        return values

    def __call__(self, model: nn.Module | None = None) -> Tensor:
        """Σ_l R(ΔW_l); pass ``model`` to evaluate on another module with the same names."""
        total: Tensor | None = None
        for group in self._groups:
            part = self._group_penalty(group, self._params(group, model)).sum()
            total = part if total is None else total + part
        for term in self.lowrank:
            part = self._lowrank_penalty(term)
            total = part if total is None else total + part
        assert total is not None
        return total

    def accumulate_grad(self, scale: float = 1.0, model: nn.Module | None = None) -> Tensor:
        """Add ``scale`` · ∇Σ_l R(ΔW_l) to the covered parameters' ``.grad``; return Σ R, detached.

        The same as ``(scale * reg(model)).backward()`` up to rounding (tested), for a loop
        that needs R's gradient once per optimizer step and nothing else from its graph:
        ΔW is built once per group instead of twice (forward and rebuilt in the backward),
        and each gradient is added in place (``addmm_``) instead of being materialised and
        then added by autograd. ``.grad`` tensors that are ``None`` are created. Not
        differentiable and bypasses autograd hooks (DDP's included): under DDP add it after
        the task gradients are reduced, as :class:`~orthoreg.training.Trainer` does (every
        rank holds identical weights, so every rank adds the identical gradient).
        ``scale`` is λ: a NaN, infinite or negative value is refused before any ``.grad``
        is touched.
        """
        scale = check_lambda(scale)
        accumulate = ESTIMATORS[self.estimator].accumulate
        total: Tensor | None = None
        for group in self._groups:
            part = accumulate(self, self._plan(group), self._params(group, model), scale).sum()
            total = part if total is None else total + part
        if self.lowrank:  # r×r products: autograd costs nothing here
            low = sum(self._lowrank_penalty(t) for t in self.lowrank)
            assert isinstance(low, Tensor)
            (scale * low).backward()
            low = low.detach()
            total = low if total is None else total + low.to(total.device)
        assert total is not None
        return total

    def regime(self, model: nn.Module | None = None) -> dict[str, dict[str, float | int]]:
        """Where each covered ΔW sits among the paper form's regimes (DESIGN §1, Regimes).

        Per covered matrix and LoRA adapter (keys as in :meth:`per_layer`): ``sigma_max`` and
        ``sigma_median`` (singular values of ΔW), ``r_over_sqrt_n`` = ‖G − I‖_F/√n (the
        *paper* form's R whatever ``form`` is: 1 at ΔW = 0, ≈ 1 while every σ ≪ 1, where its
        gradient is the negative weight decay −(2/√n)·ΔW), ``fro`` = ‖ΔW‖_F and ``n`` (the
        smaller side). Pure measurement: no gradient, no state changed (ΔW is built in the
        penalty's workspace).

        Dense ΔW: σ² are the eigenvalues (``eigvalsh``) of the Gram G, formed in the weights'
        precision (float32 at least) with the penalty's reduced-FLOP Gram, one batched call per
        shape — about a third of a penalty evaluation plus an n×n eigensolve per matrix, far
        cheaper than ``svdvals`` of ΔW. In float32 σ_i carries an absolute error of roughly
        ε·σ_max²/σ_i (ε ≈ 6e-8): negligible at the maximum and the median, large only for
        σ_i below ≈ 1e-3·σ_max, which no reported figure depends on. The median of the n
        values is numpy's (mean of the two middle ones for even n).
        LoRA (ΔW = s·B·A, rank r): the ≤ r nonzero σ, exactly, as the singular values of the
        r×r core s·R_B·R_Aᵀ of the QR factors B = Q_B R_B, Aᵀ = Q_A R_A; ``sigma_median`` is
        the median of those (the n − r zero σ would make it 0 whenever r < n/2), while
        ``r_over_sqrt_n`` and ``fro`` count the whole spectrum (each zero σ adds 1 to ‖G − I‖²).
        """
        rows: list[tuple[list[str], int, Tensor]] = []
        with torch.no_grad():
            for group in self._groups:
                params = self._params(group, model)
                with _no_autocast(params[0]):
                    deltas = self._plan(group).deltas(params)
                    if deltas.dtype not in (torch.float32, torch.float64):
                        deltas = deltas.float()
                    gram = _symmetric_gram(deltas)
                    eigen = torch.linalg.eigvalsh(gram).clamp_min_(0.0)  # σ², ascending
                rows.append((group.names, gram.shape[-1], _spectrum_stats(eigen.double(), 0)))
            for term in self.lowrank:
                sigma, n = _lowrank_singular_values(term)
                rows.append(([term.name], n, _spectrum_stats(sigma.square()[None],
                                                             n - sigma.numel())))
        out: dict[str, dict[str, float | int]] = {}
        for names, n, stats in rows:
            for name, (sigma_max, sigma_median, residual, fro) in zip(names, stats.cpu().tolist()):
                out[name] = {"sigma_max": sigma_max, "sigma_median": sigma_median,
                             "r_over_sqrt_n": residual / math.sqrt(n), "fro": fro, "n": n}
        return out

    def __repr__(self) -> str:
        return (
            f"OrthoReg(matrices={len(self.names)}, lora_adapters={len(self.lowrank)}, "
            f"groups={len(self._groups)}, form={self.form!r}, squared={self.squared}, "
            f"estimator={self.estimator!r}, matrix_rule={self.matrices!r})"
        )


def _spectrum_stats(squares: Tensor, zeros: int) -> Tensor:
    """(B, 4) float64: σ_max, median σ, ‖G − I‖_F and ‖ΔW‖_F from ascending σ² (B, k),
    ``zeros`` further zero singular values counting in ‖G − I‖_F only."""
    count = squares.shape[-1]
    middle = squares[:, [(count - 1) // 2, count // 2]].sqrt().mean(-1)  # numpy's median
    residual = ((squares - 1.0).square().sum(-1) + zeros).sqrt()
    return torch.stack([squares[:, -1].sqrt(), middle, residual, squares.sum(-1).sqrt()], dim=-1)


def _lowrank_singular_values(term: LowRankTerm) -> tuple[Tensor, int]:
    """The ≤ r nonzero singular values of s·B·A (ascending, float64) and n = min(out, in)."""
    A2 = term.A.detach().reshape(term.A.shape[0], -1).double()  # (r, in)
    B2 = term.B.detach().reshape(term.B.shape[0], -1).double()  # (out, r)
    r_b = torch.linalg.qr(B2).R  # B = Q_B R_B, R_B (k, r)
    r_a = torch.linalg.qr(A2.mT).R  # Aᵀ = Q_A R_A, R_A (k', r)
    sigma = torch.linalg.svdvals(term.scale * r_b @ r_a.mT).flip(0)
    return sigma, min(B2.shape[0], A2.shape[1])


def _exact(reg: OrthoReg, plan: _GroupPlan, weights: Sequence[Tensor]) -> Tensor:
    return penalty_form(plan.form).fused(plan, weights)


def _probes(reg: OrthoReg, weights: Sequence[Tensor]) -> Tensor:
    first = as_matrix(weights[0])
    return rademacher((len(weights), min(first.shape), reg.probes), reg.generator,
                      first.device, first.dtype)


def _hutchinson(reg: OrthoReg, plan: _GroupPlan, weights: Sequence[Tensor]) -> Tensor:
    return _HutchinsonGroupPenalty.apply(plan, _probes(reg, weights), *weights)


@dataclass(frozen=True)
class Estimator:
    """How a group of equal-shape weights becomes per-matrix penalties, shape (B,).

    ``penalty`` is differentiable (autograd); ``accumulate`` adds ``scale`` × the same
    gradient to the weights' ``.grad`` directly and returns the detached values — one pass
    over ΔW instead of two, no fresh full-size gradient (:meth:`OrthoReg.accumulate_grad`).
    Both draw the same Hutchinson probes from the same generator. ``forms``: the penalty
    forms it computes (:data:`PENALTY_FORMS`).
    """

    penalty: Callable[[OrthoReg, _GroupPlan, Sequence[Tensor]], Tensor]
    accumulate: Callable[[OrthoReg, _GroupPlan, Sequence[Tensor], float], Tensor]
    forms: frozenset[str]


ESTIMATORS: dict[str, Estimator] = {
    "exact": Estimator(_exact, _exact_accumulate, frozenset({"paper", "shape", "growth"})),
    # the probe estimate is of ‖G − I‖²_F; the other forms are not implemented for it
    "hutchinson": Estimator(_hutchinson, _hutchinson_accumulate, frozenset({"paper"})),
}


# ----------------------------------------------------------------------------- forms
@dataclass(frozen=True)
class PenaltyForm:
    """One named penalty R(ΔW) per matrix, in every implementation OrthoReg uses.

    ``dense(matrices, squared)``: R of a (…, m, n) stack, differentiable (the reference);
    ``lowrank(M, s², n, squared)``: R(s·B·A) from M = (BᵀB)(AAᵀ) (r×r), differentiable;
    ``fused(plan, weights)``: R of a group of equal-shape weights (B,), through a hand-written
    backward; ``accumulate(plan, weights, scale)``: the same values, with ``scale``·∇R added
    into ``.grad`` in place (:meth:`OrthoReg.accumulate_grad`).
    """

    name: str
    summary: str
    dense: Callable[[Tensor, bool], Tensor]
    lowrank: Callable[[Tensor, float, int, bool], Tensor]
    fused: Callable[[_GroupPlan, Sequence[Tensor]], Tensor]
    accumulate: Callable[[_GroupPlan, Sequence[Tensor], float], Tensor]


#: The penalty forms, by name (``OrthoReg(form=...)``). G is the smaller Gram of ΔW, n its
#: size (the smaller side), ḡ = tr G / n the mean squared singular value.
#:
#: ``paper`` — R = ‖G − I‖_F (``squared``: ‖G − I‖²_F), the method (Liu et al. 2026).
#: While every σ_i ≪ 1 its gradient is ≈ −(2/√n)·ΔW (squared: ≈ −4·ΔW), a negative weight
#: decay; only near σ ≈ 1 does it shape the spectrum (DESIGN §1, Regimes).
#:
#: ``shape`` — R = ‖G/ḡ − I‖_F (``squared``: ‖G/ḡ − I‖²_F), the structure-only control:
#: homogeneous of degree 0 (R(cΔW) = R(ΔW)), so ⟨∇R, ΔW⟩ = 0 (Euler) and it never grows or
#: shrinks ΔW; zero exactly when all n singular values are equal. It asks whether flattening
#: the spectrum, without the paper form's push on the magnitude, is what helps composition.
#: Guard at ΔW → 0: ḡ is clamped below by :func:`mean_floor` (√ of the dtype's smallest
#: normal number, 1.1e-19 in float32), and where tr G = 0 exactly (ΔW = 0, e.g. the first
#: step of fine-tuning, or a fresh LoRA with B = 0) R and ∇R are defined as 0, so the first
#: optimizer step is finite. Its gradient grows as 1/‖ΔW‖ for small updates. With LoRA of
#: rank r < n, R ≥ √(n(n − r)/r) (equal nonzero σ); computed exactly from r×r matrices.
#:
#: ``growth`` — the magnitude-only control: the term whose gradient is the paper form's
#: small-ΔW limit, R = √n − ‖ΔW‖²_F/√n (∇R = −(2/√n)·ΔW) or, squared, n − 2‖ΔW‖²_F
#: (∇R = −4·ΔW). The constant (√n, n) makes R equal the paper form at ΔW = 0 and to first
#: order in ‖ΔW‖²_F around it (‖G − I‖²_F = n − 2 tr G + tr G², tr G = ‖ΔW‖²_F). It asks
#: whether the paper form's benefit is just the growth of ‖ΔW‖. Unbounded below; O(m·n).
#:
#: λ does not transfer between forms: give each its own grid (DESIGN §1).
PENALTY_FORMS: dict[str, PenaltyForm] = {
    "paper": PenaltyForm("paper", "‖G − I‖_F, the method", _paper_dense, _paper_lowrank,
                         _gram_penalty, _gram_accumulate),
    "shape": PenaltyForm("shape", "‖G/ḡ − I‖_F, spectrum shape only (scale-invariant)",
                         _shape_dense, _shape_lowrank, _gram_penalty, _gram_accumulate),
    "growth": PenaltyForm("growth", "√n − ‖ΔW‖²_F/√n, magnitude only (the paper form's "
                          "small-ΔW gradient)", _growth_dense, _growth_lowrank,
                          _growth_penalty, _growth_accumulate),
}


def penalty_form(name: str) -> PenaltyForm:
    """The form called ``name``; an unknown name is a one-line error listing the known ones."""
    try:
        return PENALTY_FORMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown form {name!r}; choose from {sorted(PENALTY_FORMS)}") from None


def check_lambda(lam: float, name: str = "lam") -> float:
    """λ as a float, or a one-line ``ValueError`` naming it unless it is finite and ≥ 0."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {lam!r}") from None
    if isinstance(lam, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {lam!r}")
    return value
