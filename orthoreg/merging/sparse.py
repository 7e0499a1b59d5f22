"""Sparsify-then-combine merges: TIES (trim, elect sign, disjoint mean) and DARE (drop, rescale).

Both reduce interference entry by entry: TIES by discarding small updates and the
minority sign, DARE by discarding a random majority of updates and rescaling the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from orthoreg.merging.base import compute_dtype, merge_per_tensor
from orthoreg.merging.linear import weighted_sum
from orthoreg.merging.ops import (
    derived_seed,
    disjoint_mean,
    elect_sign,
    random_drop_rescale,
    trim_top_k,
)
from orthoreg.merging.registry import in_range, non_negative_int, register
from orthoreg.taskvector import TaskVector

#: DARE drop rate used when none is given; see `dare` for why not the paper's 0.9
DEFAULT_DROP_RATE = 0.5


def ties_tensors(tensors: Sequence[Tensor], density: float) -> Tensor:
    """TIES for one parameter: trim each task, elect the sign, average the agreeing values."""
    dtype = compute_dtype(tensors[0])
    stacked = torch.stack([trim_top_k(tensor.to(dtype), density) for tensor in tensors])
    return disjoint_mean(stacked, elect_sign(stacked))


def dare_tensors(
    name: str, tensors: Sequence[Tensor], drop_rate: float, seed: int
) -> list[Tensor]:
    """DARE-sparsified copies of one parameter's task tensors, each with its own seeded mask."""
    dropped = []
    for task_index, tensor in enumerate(tensors):
        generator = torch.Generator(device=tensor.device)
        generator.manual_seed(derived_seed(seed, task_index, name))
        dropped.append(random_drop_rescale(tensor.to(compute_dtype(tensor)), drop_rate, generator))
    return dropped


@register(
    "ties",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS)",
    constraints={"density": in_range(0.0, 1.0, low_open=True)},
)
def ties(task_vectors: Sequence[TaskVector], *, density: float = 0.2) -> TaskVector:
    """TIES-Merging (Yadav et al. 2023, Alg. 1): trim, elect sign, disjoint merge.

    For every entry p: τ̂_t = top-k%(τ_t) by magnitude; γ_p = sgn(Σ_t τ̂_t,p);
    τ_p = mean of {τ̂_t,p : sgn(τ̂_t,p) = γ_p}. Defaults: ``density=0.2`` (keep the top 20%,
    the paper's k = 20). The paper's λ is the caller's α.

    Choices the paper leaves open: trimming is *per tensor* (as in PEFT's merge_utils; the
    authors' code ranks the whole flattened vector at once, which lets large-magnitude
    layers take the budget of small ones), keeps exactly round(density·numel) ≥ 1 entries,
    and a zero sign mass elects +1.
    """
    return merge_per_tensor(task_vectors, lambda _, tensors: ties_tensors(tensors, density))


@register(
    "dare",
    paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from "
          "Homologous Models as a Free Lunch (ICML)",
    constraints={"drop_rate": in_range(0.0, 1.0, high_open=True), "seed": non_negative_int()},
)
def dare(
    task_vectors: Sequence[TaskVector], *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0
) -> TaskVector:
    """DARE + task arithmetic (Yu et al. 2024): τ_merged = Σ_t (m_t ⊙ τ_t)/(1 − p), m_t ~ Bern(1 − p).

    Defaults: ``drop_rate=0.5``, ``seed=0``. The paper shows 0.9 (even 0.99) is harmless for
    LLM SFT deltas, but also that the tolerable rate falls as delta magnitudes grow; full
    fine-tuning of small vision models (and OrthoReg, which enlarges task vectors) sits at
    that end, and the added variance per entry is τ²·p/(1 − p) (×1 at 0.5, ×9 at 0.9). So
    the default is the conservative 0.5; sweep it for a paper comparison.

    Each (task, tensor) mask is drawn from its own ``torch.Generator`` seeded from
    (``seed``, task index, tensor name), so the merge is reproducible and independent of
    key order. With ``drop_rate=0`` this is exactly task arithmetic.
    """
    return merge_per_tensor(
        task_vectors,
        lambda name, tensors: weighted_sum(dare_tensors(name, tensors, drop_rate, seed)),
    )


@register(
    "dare_ties",
    paper="Yu et al. 2024 (DARE) combined with the sign election of Yadav et al. 2023 (TIES)",
    constraints={"drop_rate": in_range(0.0, 1.0, high_open=True), "seed": non_negative_int()},
)
def dare_ties(
    task_vectors: Sequence[TaskVector], *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0
) -> TaskVector:
    """DARE in place of TIES's trim, then TIES's sign election and disjoint mean.

    τ̂_t = DARE(τ_t); γ = sgn(Σ_t τ̂_t); τ_merged = disjoint mean of the τ̂_t agreeing with γ
    (DARE as a plug-in before TIES, one of the combinations Yu et al. 2024 evaluate). Defaults: ``drop_rate=0.5``,
    ``seed=0`` (see `dare`); masks are identical to those of `dare` for the same seed.
    """

    def merge_tensor(name: str, tensors: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(dare_tensors(name, tensors, drop_rate, seed))
        return disjoint_mean(stacked, elect_sign(stacked))

    return merge_per_tensor(task_vectors, merge_tensor)
