"""The paper's CLIP fine-tuning recipe as presets: per dataset, per model, per paradigm.

Liu et al. (2026) follow Ilharco et al. (2023) and Ortiz-Jiménez et al. (2023):
AdamW, weight decay 0.1, cosine schedule with 500 warm-up steps, gradient clipping at 1.0,
batch 128 (ViT-L/14: micro-batches of 64 with 2-step accumulation, the same effective
batch in less memory), learning rate 1e-5 (LoRA: 1e-4 with rank 8, alpha 8), frozen
zero-shot heads, fp32 (the authors' code, like tangent_task_arithmetic, uses no autocast;
bf16 is opt-in), open_clip's training augmentation (:mod:`orthoreg.clip.augment`), and a
per-dataset number of epochs that makes about 2000 steps per task, counted as the authors'
loader counts them (:func:`recipe_steps`). Every paradigm runs with and without OrthoReg
(λ > 0 or λ = 0).

Every value can be overridden; :func:`train_config` records the resolved ones, which is
what a run's ``run.json`` and its resume key hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from orthoreg.clip.templates import dataset_spec
from orthoreg.paradigms import Paradigm, get_paradigm
from orthoreg.training import TrainConfig


@dataclass(frozen=True)
class ParadigmRecipe:
    """A paradigm's learning rate and how it is built with the ViT presets."""

    lr: float
    build: Callable[[dict[str, Any]], Paradigm]


#: paradigm name → recipe (the registry the CLI's --paradigm choices come from)
PARADIGM_RECIPES: dict[str, ParadigmRecipe] = {
    # every image-encoder weight trains
    "full": ParadigmRecipe(1e-5, lambda o: get_paradigm("full")),
    # tangent fine-tuning of the whole image encoder (Ortiz-Jiménez et al. 2023)
    "linear": ParadigmRecipe(1e-5, lambda o: get_paradigm("linear")),
    # attention-only: fused QKV and output projections, no biases (Jin et al. 2025)
    "partial": ParadigmRecipe(1e-5, lambda o: get_paradigm("partial", select="vit_attention")),
    # LoRA-ATT: adapters on every residual block's nn.MultiheadAttention (QKV + out-proj)
    "lora": ParadigmRecipe(1e-4, lambda o: get_paradigm(
        "lora", targets="vit_attention", rank=int(o.get("rank", 8)),
        alpha=float(o.get("alpha", 8.0)))),
}


@dataclass(frozen=True)
class BatchPreset:
    """Micro-batch size and accumulation steps: their product is the effective batch."""

    batch_size: int = 128
    accumulation: int = 1


#: model-name prefix → batch preset (longest matching prefix wins; default 128 × 1)
MODEL_BATCHES: dict[str, BatchPreset] = {
    "ViT-L-14": BatchPreset(64, 2),
}

WARMUP_STEPS = 500
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0

#: which weights the OrthoReg penalty covers (TrainConfig.matrices): exactly the 2-D ones,
#: the authors' rule, so a ViT's 4-D patch-embedding conv (``visual.conv1.weight``) is not
#: penalised; "ndim>=2" (the library default) adds it, reshaped to (out, in·kh·kw)
PENALTY_MATRICES = "2d"

#: precision name → bf16 autocast on CUDA (TrainConfig.amp); the authors train in fp32
PRECISIONS: dict[str, bool] = {"fp32": False, "bf16": True}
DEFAULT_PRECISION = "fp32"


def autocast_for(precision: str) -> bool:
    """Whether ``precision`` trains under bf16 autocast; KeyError listing the choices."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise KeyError(f"unknown precision {precision!r}; choose from "
                       f"{sorted(PRECISIONS)}") from None


def get_recipe(paradigm: str) -> ParadigmRecipe:
    try:
        return PARADIGM_RECIPES[paradigm]
    except KeyError:
        raise KeyError(f"unknown paradigm {paradigm!r}; choose from "
                       f"{sorted(PARADIGM_RECIPES)}") from None


def build_paradigm(paradigm: str, options: dict[str, Any] | None = None) -> Paradigm:
    """The paradigm with the ViT presets (``options``: LoRA ``rank``/``alpha``)."""
    return get_recipe(paradigm).build(dict(options or {}))


def batch_preset(model: str) -> BatchPreset:
    matches = [prefix for prefix in MODEL_BATCHES if model.startswith(prefix)]
    return MODEL_BATCHES[max(matches, key=len)] if matches else BatchPreset()


def recipe_steps(task: str, train_size: int, batch: BatchPreset,
                 epochs: float | None = None) -> int:
    """Optimizer steps as the authors count them: ⌊epochs × ⌈n / micro-batch⌉ / accumulation⌋.

    Their loader (a torch DataLoader without ``drop_last``) has ⌈n / b⌉ batches per epoch,
    the last one partial, and their schedule runs ``epochs × len(loader) // accumulation``
    optimizer steps. (Our Trainer draws full batches from seeded permutations, so the
    same number of steps sees the same number of images up to the partial batches.) At
    least one step; a split smaller than one micro-batch is an error, since the Trainer
    cannot draw a full batch from it.
    """
    spec = dataset_spec(task)
    epochs = spec.epochs if epochs is None else epochs
    if epochs is None:
        raise ValueError(f"task {task!r} has no preset length: pass --epochs or --steps")
    if train_size < batch.batch_size:
        raise ValueError(f"task {task!r}: {train_size} training images are fewer than one "
                         f"batch of {batch.batch_size}; lower --batch-size")
    batches_per_epoch = math.ceil(train_size / batch.batch_size)
    return max(1, int(epochs * batches_per_epoch) // batch.accumulation)


def train_config(task: str, model: str, paradigm: str, train_size: int, lam: float = 0.0,
                 *, epochs: float | None = None, steps: int | None = None,
                 batch_size: int | None = None, accumulation: int | None = None,
                 lr: float | None = None, **overrides: Any) -> TrainConfig:
    """The recipe's TrainConfig for (task, model, paradigm), with explicit overrides.

    ``overrides`` are other :class:`TrainConfig` fields (``weight_decay``, ``warmup_steps``,
    ``grad_clip``, ``squared``, ``seed``, ``amp``, ``matrices``, ``progress``, …). The
    defaults are the authors': fp32 (``amp=False``), the penalty on exactly the 2-D weights
    (``matrices="2d"``).
    """
    preset = batch_preset(model)
    batch = BatchPreset(batch_size or preset.batch_size,
                        accumulation or (preset.accumulation if batch_size is None else 1))
    if steps is None:
        steps = recipe_steps(task, train_size, batch, epochs)
    base = TrainConfig(steps=steps, batch_size=batch.batch_size,
                       accumulation=batch.accumulation,
                       lr=lr if lr is not None else get_recipe(paradigm).lr,
                       weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_STEPS,
                       grad_clip=GRAD_CLIP, lam=lam, amp=autocast_for(DEFAULT_PRECISION),
                       matrices=PENALTY_MATRICES)
    return replace(base, **overrides)
