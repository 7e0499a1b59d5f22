"""LoRA fine-tuning (Hu et al. 2022) through PEFT, on chosen modules.

The task vector is the merged dense update s·B·A of each adapted module, named by the
base weight it would be added to (``<module>.weight``, or ``in_proj_weight`` for fused
attention), so LoRA vectors merge and apply exactly like full fine-tuning ones.
OrthoReg sees the adapters and uses the exact low-rank penalty (never forming ΔW's Gram).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from orthoreg.paradigms.base import FineTunable, Paradigm, fingerprint_module, freeze_normalization
from orthoreg.regularizer import OrthoReg

#: module-name presets for LoRA targets
LORA_TARGETS: dict[str, list[str] | str] = {
    # open_clip / torch ViTs: fused QKV (nn.MultiheadAttention) and its output projection
    "vit_attention": r".*\.attn$",
    # HF BERT-style encoders (MiniLM): separate query/key/value and attention output
    "bert_attention": ["query", "key", "value", "attention.output.dense"],
}


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

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def deltas(self) -> dict[str, Tensor]:
        out = {}
        for path, module in self.adapted:
            weight = module.get_delta_weight("default")
            out[_base_param_name(path, module)] = weight
        return out

    def regularizer(self, squared: bool = False, **options: Any) -> OrthoReg:
        return OrthoReg(self.backbone, squared=squared, **options)


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
