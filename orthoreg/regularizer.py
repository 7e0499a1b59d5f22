"""The OrthoReg penalty R(ΔW) = ‖G − I‖_F, G the smaller Gram matrix of ΔW.

Liu et al. (CVPR 2026, arXiv 2604.17078), Eq. (OrthoReg objective):
``L = L_task(θ0 + Δθ) + λ Σ_l R(ΔW_l)``. The paper's text squares the norm; the authors'
code does not. Both are offered (``squared``) because λ does not transfer between them:
their gradients differ by a factor ≈ 2‖G − I‖_F.

At ΔW = 0 the gradient of R is exactly zero (G is quadratic in ΔW), so the term never
disturbs the start of fine-tuning; for small ΔW it pushes singular values towards 1.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Reference = Mapping[str, Tensor] | Literal["zero"] | None

#: parameter-name fragments that mark normalisation layers (excluded by default even when 2-D)
NORM_MARKERS = ("norm", ".bn", "bn.", "ln_", "layernorm", "batchnorm")


def as_matrix(weight: Tensor) -> Tensor:
    """View a weight as the matrix the penalty acts on: conv kernels become (out, in·kh·kw)."""
    if weight.ndim < 2:
        raise ValueError(f"OrthoReg acts on matrices; got a tensor of shape {tuple(weight.shape)}")
    return weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1)


def _gram_minus_identity(matrices: Tensor) -> Tensor:
    """G − I for a (…, m, n) stack, G on the smaller side (size min(m, n))."""
    rows, cols = matrices.shape[-2:]
    gram = matrices.mT @ matrices if rows >= cols else matrices @ matrices.mT
    gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return gram


def _finish(squared_norm: Tensor, squared: bool) -> Tensor:
    return squared_norm if squared else squared_norm.clamp_min(0.0).sqrt()


def orthoreg_penalty(delta: Tensor, squared: bool = False) -> Tensor:
    """R(ΔW) = ‖G − I‖_F (``squared=True``: ‖G − I‖²_F) for one weight update."""
    residual = _gram_minus_identity(as_matrix(delta))
    if squared:
        return residual.square().sum()
    # matrix_norm's backward is defined (zero) at a zero residual, unlike sqrt(sum(x²)).
    return torch.linalg.matrix_norm(residual, ord="fro")


def batched_penalty(deltas: Tensor, squared: bool = False) -> Tensor:
    """R for a (B, m, n) stack of equal-shape updates with one batched matmul; returns (B,)."""
    residual = _gram_minus_identity(deltas)
    if squared:
        return residual.square().sum(dim=(-2, -1))
    return torch.linalg.matrix_norm(residual, ord="fro")


def lowrank_penalty(A: Tensor, B: Tensor, scale: float, squared: bool = False) -> Tensor:
    """R(s·B·A) exactly, from r×r matrices only (never the dense ΔW or its Gram).

    With M = (BᵀB)(AAᵀ) (r×r), the nonzero spectrum of G equals that of s²M, so
    tr G = s²·tr M, tr G² = s⁴·tr M², and ‖G − I‖²_F = tr G² − 2 tr G + n with
    n = min(rows, cols) of ΔW. Because rank ΔW ≤ r, R ≥ √(n − r) whenever r < n.
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
    s2 = float(scale) ** 2
    tr_g = s2 * torch.diagonal(m).sum()
    tr_g2 = (s2 * s2) * (m * m.mT).sum()
    return _finish(tr_g2 - 2.0 * tr_g + n, squared)


def hutchinson_penalty(
    delta: Tensor, probes: int, squared: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Unbiased estimate of ‖G − I‖²_F = E_z‖(G − I)z‖² with Rademacher z, O(k·m·n).

    Unbiased only for the squared form; with ``squared=False`` it returns the square root of
    the estimate, which by Jensen underestimates R (bias shrinking as 1/k).
    """
    matrix = as_matrix(delta)
    rows, cols = matrix.shape
    n = min(rows, cols)
    z = torch.randint(0, 2, (n, probes), generator=generator, dtype=torch.int8)
    z = (z.to(matrix.device, matrix.dtype) * 2 - 1)
    if rows >= cols:  # G = ΔᵀΔ (n = cols)
        gz = matrix.mT @ (matrix @ z)
    else:  # G = ΔΔᵀ (n = rows)
        gz = matrix @ (matrix.mT @ z)
    estimate = (gz - z).square().sum() / probes
    return _finish(estimate, squared)


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


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """The matrices the penalty covers: trainable, ≥ 2-D, not normalisation, by name globs."""
    skipped = set(skip)
    chosen = []
    for name, param in model.named_parameters():
        if name in skipped or not param.requires_grad or param.ndim < 2:
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
    """Equal-shape matrices whose penalty is computed in one batched matmul."""

    def __init__(self, names: list[str], params: list[Tensor], reference: Tensor | None) -> None:
        self.names = names
        self.params = params
        self.reference = reference  # (B, m, n) stacked θ0, or None for Δ-parametrised models


class OrthoReg:
    """λ-free penalty Σ_l R(ΔW_l) over a model's selected matrices; call it every step.

    θ0 of the selected parameters is captured once, on the parameters' own device, and
    stacked per shape so that a step costs one batched Gram per distinct shape and no
    copies of the reference. ``reference="zero"`` says the parameters *are* the updates
    (the tangent paradigm stores Δ directly). LoRA adapters found in the model use the
    exact low-rank form automatically.
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
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
        if probes < 1:
            raise ValueError(f"probes must be ≥ 1, got {probes}")
        self.squared = squared
        self.estimator = estimator
        self.probes = probes
        self.generator = generator
        self.lowrank = lora_terms(model)
        lora_names = {
            name for name, p in model.named_parameters()
            if any(p is t.A or p is t.B for t in self.lowrank)
        }
        selected = select_parameters(model, include, exclude, skip=lora_names)
        if not selected and not self.lowrank:
            raise ValueError(
                "OrthoReg selected no parameters: no trainable ≥2-D weights match "
                f"include={include!r} exclude={exclude!r}"
            )
        self.names = [name for name, _ in selected]
        self._groups = self._build_groups(selected, reference)

    def _build_groups(
        self, selected: list[tuple[str, nn.Parameter]], reference: Reference
    ) -> list[_Group]:
        by_shape: dict[tuple[int | str, ...], list[tuple[str, nn.Parameter]]] = {}
        for name, param in selected:
            key = (*tuple(as_matrix(param).shape), str(param.device), str(param.dtype))
            by_shape.setdefault(key, []).append((name, param))
        groups = []
        for members in by_shape.values():
            names = [name for name, _ in members]
            params = [param for _, param in members]
            if isinstance(reference, str):
                if reference != "zero":
                    raise ValueError(f"reference must be a mapping, 'zero' or None, got {reference!r}")
                stacked = None
            else:
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
                    refs.append(as_matrix(ref.detach()).to(param.device, param.dtype))
                stacked = torch.stack(refs)  # a fresh copy, never aliasing the live weights
            groups.append(_Group(names, params, stacked))
        return groups

    def _deltas(self, group: _Group, params: list[Tensor]) -> Tensor:
        stacked = torch.stack([as_matrix(p) for p in params])
        return stacked if group.reference is None else stacked - group.reference

    def _params(self, group: _Group, model: nn.Module | None) -> list[Tensor]:
        if model is None:
            return group.params
        named = dict(model.named_parameters())
        missing = [name for name in group.names if name not in named]
        if missing:
            raise KeyError(f"model has no parameter {missing[0]!r} that this OrthoReg covers")
        return [named[name] for name in group.names]

    def per_layer(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """R(ΔW_l) for each covered matrix and LoRA adapter (for logging and diagnostics)."""
        values: dict[str, Tensor] = {}
        for group in self._groups:
            penalties = self._group_penalty(self._deltas(group, self._params(group, model)))
            values.update(zip(group.names, penalties.unbind(0)))
        for term in self.lowrank:
            values[term.name] = lowrank_penalty(term.A, term.B, term.scale, self.squared)
        return values

    def _group_penalty(self, deltas: Tensor) -> Tensor:
        return ESTIMATORS[self.estimator](self, deltas)

    def __call__(self, model: nn.Module | None = None) -> Tensor:
        """Σ_l R(ΔW_l); pass ``model`` to evaluate on another module with the same names."""
        total: Tensor | None = None
        for group in self._groups:
            part = self._group_penalty(self._deltas(group, self._params(group, model))).sum()
            total = part if total is None else total + part
        for term in self.lowrank:
            part = lowrank_penalty(term.A, term.B, term.scale, self.squared)
            total = part if total is None else total + part
        assert total is not None
        return total

    def __repr__(self) -> str:
        return (
            f"OrthoReg(matrices={len(self.names)}, lora_adapters={len(self.lowrank)}, "
            f"groups={len(self._groups)}, squared={self.squared}, estimator={self.estimator!r})"
        )


def _exact(reg: OrthoReg, deltas: Tensor) -> Tensor:
    return batched_penalty(deltas, reg.squared)


def _hutchinson(reg: OrthoReg, deltas: Tensor) -> Tensor:
    return torch.stack(
        [hutchinson_penalty(d, reg.probes, reg.squared, reg.generator) for d in deltas.unbind(0)]
    )


#: how a group of equal-shape updates is turned into per-matrix penalties
ESTIMATORS: dict[str, Callable[[OrthoReg, Tensor], Tensor]] = {
    "exact": _exact,
    "hutchinson": _hutchinson,
}
