"""Tangent (linearised) fine-tuning, Ortiz-Jiménez et al. (NeurIPS 2023), Eq. (4):

    f_lin(x; θ0 + Δ) = f(x; θ0) + J_θ f(x; θ0) · Δ

Only Δ is stored and trained; θ0 and the buffers stay frozen. One ``torch.func.jvp``
gives f0 and J·Δ together. Because f_lin is linear in Δ, an α-scaled task vector yields
f0 + α·(J·τ): the coefficient search evaluates a whole α grid from one JVP per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from orthoreg.paradigms.base import (
    FineTunable,
    Paradigm,
    ParamRule,
    fingerprint_module,
    freeze_normalization,
    parameter_rule,
)
from orthoreg.regularizer import OrthoReg
from orthoreg.taskvector import TaskVector


def _mangle(name: str) -> str:
    return name.replace(".", "__")


@contextmanager
def _forward_ad_attention() -> Iterator[None]:
    """Run attention through composite ops, which (unlike the fused kernels) have JVP rules.

    ``nn.MultiheadAttention`` in eval mode under ``no_grad`` takes the fused
    ``_native_multi_head_attention`` kernel, and ``scaled_dot_product_attention`` picks the
    flash/efficient kernels; neither supports forward AD, so a linearised ViT would fail
    (NotImplementedError) as soon as it is trained or evaluated. The math backend is the
    same attention, written in matmuls and a softmax.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class LinearizedModel(FineTunable):
    """f0(x) + J(x)·Δ around a frozen backbone; Δ lives in ``self.delta`` (base names mangled)."""

    paradigm = "linear"

    def __init__(self, backbone: nn.Module, trained: Sequence[str] | None = None) -> None:
        super().__init__(fingerprint_module(backbone))
        self.backbone = freeze_normalization(backbone).requires_grad_(False)
        params = dict(backbone.named_parameters())
        names = list(trained) if trained is not None else list(params)
        if not names:
            raise ValueError("linearised model: no parameters selected to train")
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"linearised model: backbone has no parameter {unknown[0]!r}")
        self.trained = names
        self.delta = nn.ParameterDict(
            {_mangle(n): nn.Parameter(torch.zeros_like(params[n])) for n in names}
        )

    def _primals(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.backbone.named_parameters() if n in set(self.trained)}

    def _fixed(self) -> dict[str, Tensor]:
        trained = set(self.trained)
        fixed = {n: p for n, p in self.backbone.named_parameters() if n not in trained}
        fixed.update(dict(self.backbone.named_buffers()))
        return fixed

    def value_and_jvp(self, x: Tensor, tangent: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(f(x; θ0), J(x)·tangent) in one forward-mode pass; ``tangent`` in base names."""
        primals = self._primals()
        fixed = self._fixed()
        tangents = {n: tangent[n].to(primals[n]) for n in primals}

        def f(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self.backbone, {**fixed, **params}, (x,))

        with _forward_ad_attention():
            return jvp(f, (primals,), (tangents,))

    def forward(self, x: Tensor) -> Tensor:
        f0, jd = self.value_and_jvp(x, self.deltas())
        return f0 + jd

    def deltas(self) -> dict[str, Tensor]:
        return {n: self.delta[_mangle(n)] for n in self.trained}

    def regularizer(self, squared: bool = False, form: str = "paper",
                    matrices: str = "ndim>=2", **options: Any) -> OrthoReg:
        # the parameters *are* ΔW here, so the reference is zero (no θ0 copy at all)
        return OrthoReg(self, reference="zero", squared=squared, form=form, matrices=matrices,
                        **options)

    def set_delta(self, vector: Mapping[str, Tensor], alpha: float = 1.0) -> LinearizedModel:
        with torch.no_grad():
            for n in self.trained:
                if n not in vector:
                    raise KeyError(f"task vector has no tensor {n!r} for the linearised model")
                self.delta[_mangle(n)].copy_(alpha * vector[n])
        return self


class Linear(Paradigm):
    """Train in the tangent space of θ0; ``select`` limits which parameters linearise."""

    name = "linear"

    def __init__(self, select: str | Sequence[str] | ParamRule | None = None) -> None:
        self.select = select

    def _trained(self, backbone: nn.Module) -> list[str]:
        rule = parameter_rule(self.select if self.select is not None else "all")
        return [n for n, p in backbone.named_parameters() if p.is_floating_point() and rule(n, p)]

    def prepare(self, backbone: nn.Module) -> FineTunable:
        return LinearizedModel(backbone, self._trained(backbone))

    def edited(self, backbone: nn.Module, vector: TaskVector, alpha: float) -> nn.Module:
        model = LinearizedModel(backbone, list(vector.keys()))
        return model.set_delta(vector, alpha)

    def options(self) -> dict[str, Any]:
        return {"select": self.select if not callable(self.select) else "<callable>"}
