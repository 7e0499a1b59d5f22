"""LoRA fine-tuning (Hu et al. 2022) through PEFT, on chosen modules.

The task vector is the merged dense update s·B·A of each adapted module, named by the
base weight it would be added to (``<module>.weight``, or ``in_proj_weight`` for fused
attention), so LoRA vectors merge and apply exactly like full fine-tuning ones.
OrthoReg sees the adapters and uses the exact low-rank penalty (never forming ΔW's Gram).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from orthoreg.paradigms.base import FineTunable, Paradigm, fingerprint_module, freeze_normalization
from orthoreg.regularizer import OrthoReg

#: module-name presets for LoRA targets
LORA_TARGETS: dict[str, list[str] | str] = {
    # open_clip / torch ViTs: fused QKV (nn.MultiheadAttention) and its output projection;
    # PEFT full-matches the regex, so the optional prefix also admits a top-level ``attn``
    # (as the ``partial`` preset of the same name does)
    "vit_attention": r"(.*\.)?attn$",
    # HF BERT-style encoders (MiniLM): separate query/key/value and attention output
    "bert_attention": ["query", "key", "value", "attention.output.dense"],
}


def _mha_lora_forward(layer: nn.Module, query: Tensor, *args: Any, **kwargs: Any) -> Any:
    """PEFT's LoRA ``nn.MultiheadAttention`` forward, with the deltas added functionally.

    PEFT 0.21 merges the adapters into the base weights before every call and unmerges
    after it. That (a) adds the out_proj delta twice (W + 2·s·B·A, huggingface/peft#3774)
    while ``get_delta_weight`` reports s·B·A, so the task vector would not reproduce the
    trained model, and (b) rewrites the frozen base weights as (W + Δ) − Δ on every call,
    drifting θ0 by round-off and breaking bit-identical resumption. Here the base weights
    are never written: ``functional_call`` substitutes W + Δ for the duration of the call.
    """
    base = layer.get_base_layer()
    out_proj = base.out_proj  # PEFT's LoRA Linear around the original out_proj
    w_in, w_out = base.in_proj_weight, out_proj.get_base_layer().weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            w_in = w_in + layer.get_delta_weight(adapter).to(w_in.dtype)
            w_out = w_out + out_proj.get_delta_weight(adapter).to(w_out.dtype)
    substitutes = {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}
    return functional_call(base, substitutes, (query, *args), kwargs)


def _base_param_name(module_path: str, module: nn.Module) -> str:
    path = ".".join(part for part in module_path.split(".") if part != "base_layer")
    leaf = "in_proj_weight" if isinstance(getattr(module, "base_layer", None),
                                          nn.MultiheadAttention) else "weight"
    return f"{path}.{leaf}" if path else leaf


class LoraFineTunable(FineTunable):
    paradigm = "lora"

    def __init__(self, backbone: nn.Module, targets: list[str] | str, rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(fingerprint_module(backbone))
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=targets, bias="none")
        try:
            self.backbone = inject_adapter_in_model(config, backbone)
        except ValueError as exc:
            raise ValueError(f"LoRA: targets {targets!r} match no supported module ({exc})") from exc
        freeze_normalization(self.backbone)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        self.adapted = [
            (path, module) for path, module in self.backbone.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        ]
        if not self.adapted:
            raise ValueError(f"LoRA: targets {targets!r} match no module")
        for _, module in self.adapted:
            if isinstance(module.get_base_layer(), nn.MultiheadAttention):
                module.forward = types.MethodType(_mha_lora_forward, module)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def deltas(self) -> dict[str, Tensor]:
        out = {}
        for path, module in self.adapted:
            weight = module.get_delta_weight("default")
            out[_base_param_name(path, module)] = weight
        return out

    def regularizer(self, squared: bool = False, form: str = "paper",
                    matrices: str = "ndim>=2", **options: Any) -> OrthoReg:
        # adapters only: "2d" drops adapters of conv kernels (their ΔW is 4-D)
        return OrthoReg(self.backbone, squared=squared, form=form, matrices=matrices, **options)


class Lora(Paradigm):
    """Low-rank adapters of rank ``rank`` and scale ``alpha / rank`` on ``targets``."""

    name = "lora"

    def __init__(self, targets: str | Sequence[str] = "vit_attention", rank: int = 8,
                 alpha: float = 8.0, dropout: float = 0.0) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        self.targets = targets
        self.rank, self.alpha, self.dropout = rank, alpha, dropout

    def _resolved_targets(self, backbone: nn.Module) -> list[str] | str:
        if isinstance(self.targets, str) and self.targets in LORA_TARGETS:
            return LORA_TARGETS[self.targets]
        if isinstance(self.targets, str) and self.targets == "pointwise":
            return [n for n, m in backbone.named_modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
        return self.targets if isinstance(self.targets, str) else list(self.targets)

    def prepare(self, backbone: nn.Module) -> FineTunable:
        return LoraFineTunable(backbone, self._resolved_targets(backbone), self.rank,
                               self.alpha, self.dropout)

    def options(self) -> dict[str, Any]:
        return {"targets": self.targets, "rank": self.rank, "alpha": self.alpha}
