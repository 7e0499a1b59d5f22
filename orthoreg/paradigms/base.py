"""The protocol every fine-tuning paradigm follows.

A paradigm turns a pretrained backbone into a :class:`FineTunable`: a module to train, a
regulariser over *its* notion of ΔW, and a task vector in the **base model's parameter
names**. Naming every vector in θ0's coordinates is what lets merges, searches and
diagnostics treat all paradigms alike; only :meth:`Paradigm.edited` (how θ0 + α·τ is
evaluated) differs, because tangent vectors live on the linearised model.
"""

from __future__ import annotations

import abc
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from orthoreg.regularizer import OrthoReg
from orthoreg.taskvector import TaskVector
from orthoreg.utils.provenance import fingerprint_state


def freeze_normalization(module: nn.Module) -> nn.Module:
    """Keep BatchNorm running statistics fixed: they belong to θ0, not to the task vector."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()
    return module


def base_state(module: nn.Module) -> dict[str, Tensor]:
    """θ0 as a detached copy of parameters and buffers, on their own device."""
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


class FineTunable(nn.Module, abc.ABC):
    """What a paradigm hands the training loop: ``forward(x)`` gives backbone features."""

    paradigm: str

    def __init__(self, base_fingerprint: str) -> None:
        super().__init__()
        self.base_fingerprint = base_fingerprint

    def train(self, mode: bool = True) -> FineTunable:
        super().train(mode)
        return freeze_normalization(self)  # type: ignore[return-value]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @abc.abstractmethod
    def deltas(self) -> dict[str, Tensor]:
        """ΔW per base-model parameter name (differentiable where the paradigm trains it)."""

    @abc.abstractmethod
    def regularizer(self, squared: bool = False, form: str = "paper",
                    matrices: str = "ndim>=2", **options: Any) -> OrthoReg:
        """The OrthoReg penalty over this paradigm's trained matrices.

        ``form``: the penalty per matrix (``paper``, ``shape``, ``growth``; see
        :data:`orthoreg.regularizer.PENALTY_FORMS`); ``matrices``: which weights count
        (``"ndim>=2"`` or ``"2d"``, :data:`orthoreg.regularizer.MATRIX_RULES`); further
        options (``estimator``, ``probes``, ``include``, ``exclude``) go to :class:`OrthoReg`.
        """

    def task_vector(self, metadata: Mapping[str, Any] | None = None) -> TaskVector:
        with torch.no_grad():
            tensors = {k: v.detach().clone() for k, v in self.deltas().items()}
        meta = {"paradigm": self.paradigm, "base_fingerprint": self.base_fingerprint}
        return TaskVector(tensors, {**meta, **(metadata or {})})


class Paradigm(abc.ABC):
    """A named way of fine-tuning; instances are cheap option holders."""

    name: ClassVar[str]

    @abc.abstractmethod
    def prepare(self, backbone: nn.Module) -> FineTunable:
        """Wrap ``backbone`` (modified in place: pass a copy to keep the original)."""

    def edited(self, backbone: nn.Module, vector: TaskVector, alpha: float) -> nn.Module:
        """A model computing f(x; θ0 + α·τ): the backbone with its weights moved in place."""
        vector.apply_to(backbone, alpha)
        return backbone

    def options(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------- selection
ParamRule = Callable[[str, nn.Parameter], bool]

#: named parameter subsets for the ``partial`` paradigm and for LoRA targets
SELECTION_PRESETS: dict[str, ParamRule] = {
    # attention-only fine-tuning (Jin et al. 2025): fused QKV and output projection, no biases
    "vit_attention": lambda n, p: n.endswith("attn.in_proj_weight")
    or n.endswith("attn.out_proj.weight"),
    # the nearest CNN analogue: 1×1 (pointwise) convolutions mix channels like projections do
    "pointwise": lambda n, p: p.ndim == 4 and p.shape[-1] == 1 and p.shape[-2] == 1
    and p.shape[1] > 1,
    # the same for HF BERT-style encoders (MiniLM): separate query/key/value projections and
    # the attention output projection, weights only (not the FFN's output.dense)
    "bert_attention": lambda n, p: re.search(
        r"(^|\.)attention\.(self\.(query|key|value)|output\.dense)\.weight$", n) is not None,
    "matrices": lambda n, p: p.ndim >= 2,
    "all": lambda n, p: True,
}


def parameter_rule(select: str | Sequence[str] | ParamRule) -> ParamRule:
    """A preset name, a list of name globs, or a predicate → a predicate."""
    if callable(select):
        return select
    if isinstance(select, str):
        if select in SELECTION_PRESETS:
            return SELECTION_PRESETS[select]
        select = [select]
    globs = list(select)
    return lambda name, _: any(fnmatch.fnmatchcase(name, g) for g in globs)


def fingerprint_module(module: nn.Module) -> str:
    return fingerprint_state(module.state_dict())
