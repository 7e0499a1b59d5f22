"""Full (non-linear) and partial fine-tuning: ΔW = θ − θ0 on the trained parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from orthoreg.paradigms.base import (
    FineTunable,
    Paradigm,
    ParamRule,
    fingerprint_module,
    freeze_normalization,
    parameter_rule,
)
from orthoreg.regularizer import OrthoReg, as_matrix, select_parameters


class DirectFineTunable(FineTunable):
    """The backbone itself, with θ0 of its trained parameters kept beside it on-device.

    θ0 is the only copy of the reference weights: it is stored stacked, one buffer per
    (matrix shape, dtype, covered by OrthoReg's default selection), in parameter order, and
    :meth:`regularizer` hands OrthoReg views into these stacks, which it borrows rather than
    copies, so no second θ0 exists.
    """

    def __init__(self, backbone: nn.Module, paradigm: str, trained: list[str]) -> None:
        super().__init__(fingerprint_module(backbone))
        self.paradigm = paradigm
        self.backbone = freeze_normalization(backbone)
        if not trained:
            raise ValueError(f"paradigm {paradigm!r} selected no parameters to train")
        params = dict(backbone.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in trained)
        self.trained = trained
        # θ0 of the trained tensors only: one copy, made once; non-persistent buffers so
        # that ``.to(device)`` moves it with the weights and state_dict() stays θ-only
        covered = {name for name, _ in select_parameters(backbone)}
        stacks: dict[tuple[object, ...], list[str]] = {}
        for name in trained:
            param = params[name]
            shape = tuple(as_matrix(param).shape) if param.ndim >= 2 else tuple(param.shape)
            stacks.setdefault((shape, param.dtype, name in covered), []).append(name)
        self._theta0_slots: dict[str, tuple[str, int, torch.Size]] = {}
        for index, names in enumerate(stacks.values()):
            buffer = f"theta0__{index}"
            stacked = torch.stack([
                as_matrix(params[n]).detach() if params[n].ndim >= 2 else params[n].detach()
                for n in names
            ])
            self.register_buffer(buffer, stacked, persistent=False)
            for slot, name in enumerate(names):
                self._theta0_slots[name] = (buffer, slot, params[name].shape)

    @property
    def reference(self) -> dict[str, Tensor]:
        """θ0 per trained parameter name: views into the stacked buffers, never copies."""
        slots = self._theta0_slots
        return {
            name: getattr(self, slots[name][0])[slots[name][1]].view(slots[name][2])
            for name in self.trained
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def deltas(self) -> dict[str, Tensor]:
        params = dict(self.backbone.named_parameters())
        return {name: params[name] - theta0 for name, theta0 in self.reference.items()}

    def regularizer(self, squared: bool = False, form: str = "paper",
                    matrices: str = "ndim>=2", **options: Any) -> OrthoReg:
        return OrthoReg(self.backbone, reference=self.reference, squared=squared, form=form,
                        matrices=matrices, **options)


class Full(Paradigm):
    """Every parameter trains (Ilharco et al. 2023); BatchNorm statistics stay θ0's."""

    name = "full"

    def prepare(self, backbone: nn.Module) -> FineTunable:
        trained = [n for n, p in backbone.named_parameters() if p.is_floating_point()]
        return DirectFineTunable(backbone, self.name, trained)


class Partial(Paradigm):
    """A named subset trains (attention-only FT, Jin et al. 2025, generalised).

    ``select`` is a preset (``vit_attention``, ``pointwise``), name globs, or a predicate.
    """

    name = "partial"

    def __init__(self, select: str | Sequence[str] | ParamRule = "vit_attention") -> None:
        self.select = select
        self._rule = parameter_rule(select)

    def prepare(self, backbone: nn.Module) -> FineTunable:
        trained = [n for n, p in backbone.named_parameters() if self._rule(n, p)]
        if not trained:
            raise ValueError(
                f"partial fine-tuning: selection {self.select!r} matches no parameter of "
                f"{type(backbone).__name__}"
            )
        return DirectFineTunable(backbone, self.name, trained)

    def options(self) -> dict[str, Any]:
        return {"select": self.select if not callable(self.select) else "<callable>"}
