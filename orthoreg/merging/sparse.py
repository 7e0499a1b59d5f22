"""Sparsify-then-combine merges: TIES (trim, elect sign, disjoint mean) and DARE (drop, rescale).

Both reduce interference entry by entry: TIES by discarding small updates and the
minority sign, DARE by discarding a random majority of updates and rescaling the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from orthoreg.merging.base import compute_dtype, merge_per_tensor, merged_metadata
from orthoreg.merging.linear import weighted_sum
from orthoreg.merging.ops import (
    derived_seed,
    disjoint_mean,
    elect_sign,
    magnitude_threshold,
    mass_sign,
    random_drop_rescale,
    resolve_zero_signs,
    trim_below,
    trim_top_k,
)
from orthoreg.merging.registry import (
    WIDE_ALPHAS,
    in_range,
    non_negative_int,
    one_of,
    register,
)
from orthoreg.taskvector import TaskVector

#: DARE drop rate used when none is given; see `dare` for why not the paper's
DEFAULT_DROP_RATE = 0.5
#: the drop rate of the DARE paper's main experiments (Yu et al. 2024: p = 0.9), which the
#: CLIP recipe uses (registry ``paper_params``)
PAPER_DROP_RATE = 0.9
#: TIES trim scopes: over the whole task vector (the paper's code) or tensor by tensor (PEFT)
TIES_TRIMS = ("global", "per_tensor")
_WIDE_SOURCE = ("Gargiulo et al. 2025 (TSV) reference code, np.linspace(0, 3, 31)[1:]: "
                "0.1, 0.2, …, 3.0")


def ties_tensors(tensors: Sequence[Tensor], density: float) -> Tensor:
    """Per-tensor TIES for one parameter, exactly PEFT's ``merge_utils.ties`` (unit weights).

    Trim each task to its ⌊density·numel⌋ largest magnitudes, elect the sign by mass
    (zero → +1), average the agreeing values.
    """
    dtype = compute_dtype(tensors[0])
    stacked = torch.stack([trim_top_k(tensor.to(dtype), density) for tensor in tensors])
    return disjoint_mean(stacked, elect_sign(stacked))


def global_thresholds(task_vectors: Sequence[TaskVector], density: float) -> list[Tensor]:
    """Per task, the magnitude its global trim keeps (:func:`ops.magnitude_threshold`).

    One task's |τ| is flattened at a time (d floats, in the compute dtype), never the T × d
    matrix the original code stacks.
    """
    thresholds = []
    for vector in task_vectors:
        magnitudes = torch.cat([tensor.detach().to(compute_dtype(tensor)).abs().reshape(-1)
                                for tensor in vector.values()])
        thresholds.append(magnitude_threshold(magnitudes, density))
        del magnitudes
    return thresholds


def ties_global(task_vectors: Sequence[TaskVector], density: float) -> TaskVector:
    """TIES as the paper's code computes it over the flattened task vectors, tensor by tensor.

    Trim: each task keeps its entries with |τ| ≥ its whole-vector threshold
    (:func:`global_thresholds`). Elect: sgn(Σ_t τ̂_t); entries whose sum is exactly zero
    take the majority sign of all elected signs (the code's ``resolve_zero_signs``),
    which needs one pass over every tensor before the merge. Then the disjoint mean.
    Elementwise steps do not care how the vector is cut, so this equals the flattened
    computation while holding one tensor × T at a time.
    """
    thresholds = global_thresholds(task_vectors, density)

    def trimmed(name: str) -> Tensor:
        dtype = compute_dtype(task_vectors[0][name])
        return torch.stack([trim_below(vector[name].to(dtype), threshold.to(dtype))
                            for vector, threshold in zip(task_vectors, thresholds)])

    balance = sum(int(mass_sign(trimmed(name)).sum()) for name in task_vectors[0].keys())
    majority = float((balance > 0) - (balance < 0))
    merged = {}
    for name, first in task_vectors[0].items():
        stacked = trimmed(name)
        sign = resolve_zero_signs(mass_sign(stacked), majority)
        merged[name] = disjoint_mean(stacked, sign).to(first.dtype)
    return TaskVector(merged, merged_metadata(task_vectors))


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
    constraints={"density": in_range(0.0, 1.0, low_open=True), "trim": one_of(*TIES_TRIMS)},
    alphas=WIDE_ALPHAS,
    alphas_source=_WIDE_SOURCE,
)
def ties(
    task_vectors: Sequence[TaskVector], *, density: float = 0.2, trim: str = "global"
) -> TaskVector:
    """TIES-Merging (Yadav et al. 2023, Alg. 1): trim, elect sign, disjoint merge.

    For every entry p: τ̂_t = top-k%(τ_t) by magnitude; γ_p = sgn(Σ_t τ̂_t,p);
    τ_p = mean of {τ̂_t,p : sgn(τ̂_t,p) = γ_p}. Defaults: ``density=0.2`` (keep the top 20%,
    the paper's k = 20), ``trim="global"``. The paper's λ is the caller's α; because the
    merge is a *mean*, its reference searches α on 0.1…3.0 (``default_alphas``).

    ``trim="global"`` is the paper's code: the top k% of each task vector as a whole
    (|τ| ≥ the (d − ⌊d·k⌋)-th smallest magnitude over all d entries, ties kept), which lets
    large-magnitude layers take the budget of small ones; a zero sign mass takes the
    vector's majority sign. ``trim="per_tensor"`` is PEFT's ``merge_utils.ties`` exactly:
    each tensor keeps its ⌊k·numel⌋ largest entries (a tensor with fewer than 1/k entries
    keeps none), and a zero sign mass elects +1.
    """
    if trim == "global":
        return ties_global(task_vectors, density)
    return merge_per_tensor(task_vectors, lambda _, tensors: ties_tensors(tensors, density))


@register(
    "dare",
    paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from "
          "Homologous Models as a Free Lunch (ICML)",
    constraints={"drop_rate": in_range(0.0, 1.0, high_open=True), "seed": non_negative_int()},
    paper_params={"drop_rate": PAPER_DROP_RATE},
)
def dare(
    task_vectors: Sequence[TaskVector], *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0
) -> TaskVector:
    """DARE + task arithmetic (Yu et al. 2024): τ_merged = Σ_t (m_t ⊙ τ_t)/(1 − p), m_t ~ Bern(1 − p).

    Defaults: ``drop_rate=0.5`` (the paper: **0.9**, ``PAPER_DROP_RATE``, which the CLIP
    recipe uses), ``seed=0``. The paper shows 0.9 (even 0.99) is harmless for LLM SFT
    deltas, but also that the tolerable rate falls as delta magnitudes grow; full
    fine-tuning of small vision models (and OrthoReg, which enlarges task vectors) sits at
    that end, and the added variance per entry is τ²·p/(1 − p) (×1 at 0.5, ×9 at 0.9). So
    the library default is the conservative 0.5. The merge is a (rescaled) sum with
    E[τ̂] = τ, so α is searched on task arithmetic's 0…1 grid.

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
    alphas=WIDE_ALPHAS,
    alphas_source=_WIDE_SOURCE,
    paper_params={"drop_rate": PAPER_DROP_RATE},
)
def dare_ties(
    task_vectors: Sequence[TaskVector], *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0
) -> TaskVector:
    """DARE in place of TIES's trim, then TIES's sign election and disjoint mean.

    τ̂_t = DARE(τ_t); γ = sgn(Σ_t τ̂_t); τ_merged = disjoint mean of the τ̂_t agreeing with γ
    (DARE as a plug-in before TIES, one of the combinations Yu et al. 2024 evaluate).
    Defaults: ``drop_rate=0.5`` (the paper: 0.9), ``seed=0`` (see `dare`); masks are
    identical to those of `dare` for the same seed. A mean, like TIES: α on 0.1…3.0.
    """

    def merge_tensor(name: str, tensors: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(dare_tensors(name, tensors, drop_rate, seed))
        return disjoint_mean(stacked, elect_sign(stacked))

    return merge_per_tensor(task_vectors, merge_tensor)
