"""Frozen zero-shot classification heads: class names × prompt templates → one fixed vector each.

In the paper's protocol (Ilharco et al. 2023; Liu et al. 2026) every task's classifier is
built once from a *text* encoder and frozen: a task vector then changes only the encoder,
and vectors of different tasks can be added under one set of heads. The construction is
the same whichever encoder embeds the prompts — CLIP's text tower for images
(:mod:`orthoreg.clip.model`), or the sentence encoder itself for text tasks
(:mod:`orthoreg.zoo.text`) — so it lives here, below both:

    e_{c,t} = normalize(encode(template_t.format(class_c)))
    W_c     = normalize(mean_t e_{c,t})                   (Radford et al. 2021, ensembling)
    logits  = scale · normalize(f(x)) @ Wᵀ

Each prompt's embedding is normalised before the per-class average so that no template
dominates by norm; the average is renormalised so every class sits on the unit sphere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthoreg.utils.io import OrthoRegFileError, read_tensors, save_tensors

#: the ``kind`` recorded in a head file (the name predates text heads; kept so cached
#: heads stay loadable)
HEAD_KIND = "orthoreg.clip_zeroshot_head"

Encoder = Callable[[list[str]], Tensor]
"""Maps a list of prompts to their embeddings, one row per prompt."""


@torch.no_grad()
def zeroshot_weights(encode: Encoder, classnames: Sequence[str],
                     templates: Sequence[str]) -> Tensor:
    """Class embeddings ``(classes, dim)``: per class, the renormalised mean of its prompts.

    ``encode`` is called once per class with that class's prompts (one batch per class keeps
    memory bounded for 1000-class tasks). Every template must contain ``{}`` exactly where
    the class name goes; a template without it would give every class the same prompt.
    """
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    rows = []
    for classname in classnames:
        embeddings = F.normalize(encode([t.format(classname) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows)


class ZeroShotHead(nn.Module):
    """Frozen zero-shot classifier: ``logits = scale · normalize(f) @ Wᵀ`` (all buffers)."""

    def __init__(self, weight: Tensor, scale: float, metadata: dict[str, Any] | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"class embeddings must be (classes, dim), got {tuple(weight.shape)}")
        self.register_buffer("weight", weight.detach().float().contiguous().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.metadata = dict(metadata or {})

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        weight = self.weight.to(features.dtype)
        return self.scale.to(features.dtype) * F.normalize(features, dim=-1) @ weight.T

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {**self.metadata, "kind": HEAD_KIND, "num_classes": self.num_classes}
        return save_tensors(path, {"weight": self.weight, "scale": self.scale}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ZeroShotHead:
        tensors, meta = read_tensors(path)
        if meta.get("kind") != HEAD_KIND or not {"weight", "scale"} <= set(tensors):
            raise OrthoRegFileError(f"{path}: not a zero-shot head file")
        return cls(tensors["weight"], float(tensors["scale"]), meta)
