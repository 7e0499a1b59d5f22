"""The models, data and penalty variants ``python -m orthoreg.bench penalty`` times.

(a) ``cnn_full``  — the zoo's MobileNetV2, full fine-tuning, 64 px, batch 32.
(b) ``vit_full``, ``vit_attn`` — a ViT-B/32-shaped transformer (width 768, 12 layers,
    fused QKV ``attn.in_proj_weight`` 2304×768, MLP 3072×768 / 768×3072, patch conv
    768×3×32×32; random init) at a batch two CPU cores can take, full and attention-only
    (``partial`` with the ``vit_attention`` preset); exact penalty, and for full FT also
    Hutchinson's estimator with k probes.
(c) ``vit_lora``  — LoRA rank 8 on that ViT's attention, with the low-rank penalty.
Every workload also has the penalty forms ``shape`` and ``growth`` (variants ``exact-shape``,
``exact-growth``; ``lowrank-…`` for LoRA), through the same fused path as ``exact``.

The ViT is built here rather than loaded so that the benchmark needs no download and has
the paper's matrix shapes, which are what the penalty's cost depends on; its weights are
random because timing does not depend on them. Everything is seeded from ``--seed``: the
same workload rebuilt in a fresh process (the memory probes) is the same model and batch.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orthoreg.paradigms import Full, Lora, Partial
from orthoreg.paradigms.base import FineTunable

CLASSES = 10
WORKLOADS = ("cnn_full", "vit_full", "vit_attn", "vit_lora")
#: penalty forms timed beside the paper's, as variants ``exact-<form>`` (``lowrank-<form>``)
FORM_VARIANTS = ("shape", "growth")


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block named like open_clip's (``attn``, ``mlp.c_fc``, ``mlp.c_proj``).

    The names matter: the ``vit_attention`` presets of ``partial`` and ``lora`` select by them.
    """

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """CLIP ViT-B/32's image tower, layer for layer (87.8 M parameters at 224 px), random init."""

    def __init__(self, image_size: int = 224, patch: int = 32, width: int = 768,
                 layers: int = 12, heads: int = 12, mlp_width: int = 3072,
                 output_dim: int = 512) -> None:
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)
        self.feature_dim = output_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.transformer(self.ln_pre(x + self.positional_embedding))
        return self.ln_post(x[:, 0]) @ self.proj


@dataclass
class Workload:
    """One model to time, with its frozen head, two batches of data and its penalty variants.

    ``penalties`` maps a variant's name to a factory of its regularizer (``None`` for the
    baseline ``off``): factories, so that a memory probe builds only the one it measures.
    """

    name: str
    label: str
    model: FineTunable
    head: nn.Module
    data: TensorDataset
    batch: int
    image: int
    penalties: dict[str, Callable[[], Any]] = field(default_factory=dict)


def _cnn_backbone(seed: int) -> tuple[nn.Module, str]:
    """The zoo's MobileNetV2, pretrained where its weights are fetched (the label says which)."""
    from orthoreg.zoo.vision.models import get_model

    try:
        return get_model("mobilenet_v2", seed=seed), "MobileNetV2 (zoo, pretrained)"
    except Exception as exc:  # assets not fetched: same architecture, random weights
        return (get_model("mobilenet_v2", pretrained=False, seed=seed),
                f"MobileNetV2 (zoo, random init: {type(exc).__name__})")


def build_workload(name: str, args: argparse.Namespace) -> Workload:
    """Build workload ``name`` (one of :data:`WORKLOADS`) at the sizes and seed in ``args``."""
    torch.manual_seed(args.seed)
    if name == "cnn_full":
        backbone, label = _cnn_backbone(args.seed)
        model: FineTunable = Full().prepare(backbone)
        batch, image, features = args.cnn_batch, args.cnn_image, backbone.feature_dim
        label = f"(a) {label}, full FT"
    else:
        backbone = VisionTransformer(image_size=args.vit_image)
        batch, image, features = args.vit_batch, args.vit_image, backbone.feature_dim
        if name == "vit_full":
            model, label = Full().prepare(backbone), "(b) ViT-B/32 shape, full FT"
        elif name == "vit_attn":
            model = Partial("vit_attention").prepare(backbone)
            label = "(b) ViT-B/32 shape, attention-only FT"
        elif name == "vit_lora":
            model = Lora(targets="vit_attention", rank=8, alpha=8.0).prepare(backbone)
            label = "(c) ViT-B/32 shape, LoRA r8 on attention"
        else:
            raise KeyError(f"unknown workload {name!r}")
    head = nn.Linear(features, CLASSES)
    generator = torch.Generator().manual_seed(args.seed)
    count = 2 * batch
    data = TensorDataset(torch.randn(count, 3, image, image, generator=generator),
                         torch.randint(0, CLASSES, (count,), generator=generator))
    work = Workload(name, label, model, head, data, batch, image)
    work.penalties["off"] = lambda: None
    exact = "lowrank" if name == "vit_lora" else "exact"
    work.penalties[exact] = lambda: model.regularizer(squared=False)
    for form in FORM_VARIANTS:  # the controls of the mechanism study, same path otherwise
        work.penalties[f"{exact}-{form}"] = (
            lambda form=form: model.regularizer(squared=False, form=form))
    if name == "vit_full":
        work.penalties[f"hutchinson k={args.probes}"] = lambda: model.regularizer(
            squared=True, estimator="hutchinson", probes=args.probes)
    return work
