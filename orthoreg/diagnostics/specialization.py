"""Task-feature specialization (TFS): do different tasks rely on different input features?

The OrthoReg paper (Liu et al. 2026, Definition 2) argues a chain: when tasks rely on
disjoint subsets of a layer's input features (TFS), fine-tuning moves disjoint columns of
that layer's W — the gradient ∂L/∂W = Σ (∂L/∂y)·zᵀ only grows column k where feature k
matters — so task vectors come out orthogonal, the model is weight disentangled and task
arithmetic works. This module measures the first link. The definition below is ours,
derived from the paper's; it is precise so that numbers are comparable across runs.

**Definition.** For a layer with input activation z (a ``Conv*d``: features k are input
channels; a ``Linear``: input dimensions), a task t with inputs D_t and head h_t, and a
per-example objective ℓ(x) computed from the logits h_t(f(x)):

    a_{t,k} = E_{x∈D_t} Σ_s |∂ℓ(x) / ∂z_{k,s}(x)|        (s runs over spatial positions
                                                            and any other non-feature axes)
    I_t     = the smallest set of features whose a_{t,k} sum to ≥ ``share`` (default 0.9)
              of Σ_k a_{t,k}  (features taken by decreasing a, ties by index)
    overlap(t, u) = |I_t ∩ I_u| / |I_t ∪ I_u|             (Jaccard; NaN if both are empty)

**Objective.** By default ℓ is the logit of the true class (``"true_logit"``), not the
loss: the cross-entropy gradient is scaled by (1 − p_y), so on a task the model already
solves it vanishes and the task would look as if it relied on nothing; the logit's
gradient says which features the task's decision reads, however confident the model is.
``"loss"`` (cross-entropy through the head) is registered too, for the gradient that
actually drives fine-tuning.

**Chance level.** Two random sets of sizes |I_t| and |I_u| out of K features share
|I_t|·|I_u|/K features on average; the Jaccard of that expected overlap is reported as
``chance``, because a share of 0.9 makes I_t large and high overlaps are then expected
even without any shared reliance. Specialization shows as overlap well below chance.

Attributions are taken at θ0 by default (TFS is a property of the pretrained features the
tasks start from), or at θ0 + τ_t for task t when weight-space vectors are given. They use
forward hooks on a bounded number of examples (default 128 per task), in eval mode.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthoreg.diagnostics.base import TaskProbe
from orthoreg.evaluation.accuracy import evaluation_mode, model_device
from orthoreg.evaluation.resident import ResidentModel, as_resident
from orthoreg.taskvector import TaskVector

#: ℓ(logits [B, C], labels [B]) -> per-example objective [B]
Objective = Callable[[Tensor, Tensor], Tensor]
OBJECTIVES: dict[str, Objective] = {}

#: layer types whose input features are scored, and the axis of z that holds the features
FEATURE_AXES: dict[type[nn.Module], int] = {
    nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1, nn.Linear: -1,
}

DEFAULT_SHARE = 0.9
DEFAULT_EXAMPLES = 128
DEFAULT_OBJECTIVE = "true_logit"


def register_objective(name: str) -> Callable[[Objective], Objective]:
    """Register a per-example attribution objective ℓ under ``name``."""

    def decorate(objective: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"attribution objective {name!r} is already registered")
        OBJECTIVES[name] = objective
        return objective

    return decorate


@register_objective("true_logit")
def true_logit(logits: Tensor, labels: Tensor) -> Tensor:
    """The logit of the true class (the default; see the module docstring for why)."""
    return logits.gather(1, labels[:, None]).squeeze(1)


@register_objective("loss")
def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The task loss, cross-entropy through the frozen head."""
    return F.cross_entropy(logits, labels, reduction="none")


def feature_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """Every module whose input features can be scored (types in FEATURE_AXES), by name."""
    return {name: module for name, module in backbone.named_modules()
            if isinstance(module, tuple(FEATURE_AXES))}


def _feature_axis(module: nn.Module) -> int:
    for kind, axis in FEATURE_AXES.items():
        if isinstance(module, kind):
            return axis
    raise TypeError(f"no feature axis registered for {type(module).__name__}")


@contextlib.contextmanager
def _capture_inputs(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Forward hooks that keep every input activation z of ``layers`` (several calls add up)."""
    captured: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = []
    for name, module in layers.items():
        def hook(_module: nn.Module, inputs: tuple[Any, ...], _out: Any, name: str = name) -> None:
            if inputs and isinstance(inputs[0], Tensor) and inputs[0].requires_grad:
                captured[name].append(inputs[0])
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _mass(gradient: Tensor, axis: int) -> Tensor:
    """Σ over examples and every non-feature axis of |g| → one value per feature (float64)."""
    moved = gradient.detach().abs().double().movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1]).sum(dim=0).cpu()


def attribution_mass(
    backbone: nn.Module,
    task: TaskProbe,
    layers: Mapping[str, nn.Module] | Sequence[str] | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    max_examples: int | None = DEFAULT_EXAMPLES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Tensor]:
    """a_{t,k} per layer: mean over examples of Σ_s |∂ℓ/∂z_{k,s}| (module docstring).

    ``layers`` are modules or names of ``backbone``'s modules (default: every conv and
    linear layer). The backbone's weights, flags and modes are left as they were; the
    gradient is taken with respect to the activations only (parameters are untouched).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
    if layers is None:
        chosen = feature_layers(backbone)
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        modules = dict(backbone.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise KeyError(f"backbone has no module {missing[0]!r}")
        chosen = {name: modules[name] for name in layers}
    if not chosen:
        raise ValueError("no layers to score (the backbone has no conv or linear layers)")
    inputs, labels = task.sample(max_examples, seed)
    device = model_device(backbone)
    totals: dict[str, Tensor] = {}
    with evaluation_mode(backbone, task.head), torch.enable_grad():
        for start in range(0, len(labels), batch_size):
            x = inputs[start : start + batch_size].to(device).detach().requires_grad_(True)
            y = labels[start : start + batch_size].to(device)
            with _capture_inputs(chosen) as captured:
                logits = task.head(backbone(x))
            if start == 0 and logits.shape[-1] <= int(labels.max()):
                raise ValueError(f"task {task.name!r}: the head has {logits.shape[-1]} classes "
                                 f"but labels go up to {int(labels.max())}")
            names = [name for name in chosen for _ in captured[name]]
            tensors = [t for name in chosen for t in captured[name]]
            if not tensors:
                raise ValueError("none of the layers saw an input that depends on x")
            grads = torch.autograd.grad(OBJECTIVES[objective](logits, y).sum(), tensors,
                                        allow_unused=True)
            for name, tensor, grad in zip(names, tensors, grads):
                if grad is None:
                    grad = torch.zeros_like(tensor)
                mass = _mass(grad, _feature_axis(chosen[name]))
                totals[name] = totals[name] + mass if name in totals else mass
    return {name: totals[name] / len(labels) for name in chosen if name in totals}


def specialized_set(mass: Tensor, share: float = DEFAULT_SHARE) -> Tensor:
    """Indices of the smallest feature set holding ≥ ``share`` of the mass (sorted).

    Features are taken by decreasing mass, ties by index, so the set is deterministic.
    A layer with zero total mass (the task does not depend on it) has an empty set.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    mass = mass.double().flatten()
    total = float(mass.sum())
    if total <= 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(-mass, stable=True).indices
    cumulative = torch.cumsum(mass[order], 0)
    # tolerance: a share of 1.0 must not miss the last feature to rounding
    count = int((cumulative < share * total * (1 - 1e-12)).sum()) + 1
    return order[: min(count, len(order))].sort().values


def jaccard(first: Tensor, second: Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets; NaN when both are empty."""
    a, b = set(first.tolist()), set(second.tolist())
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


def chance_jaccard(size_a: int, size_b: int, features: int) -> float:
    """Jaccard of the expected overlap of two random subsets of the given sizes."""
    if features == 0 or size_a + size_b == 0:
        return float("nan")
    shared = size_a * size_b / features
    return shared / (size_a + size_b - shared)


@dataclass(frozen=True)
class SpecializationResult:
    """Per layer and task pair: Jaccard overlap of the specialized sets, and chance."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...]
    share: float
    objective: str
    mass: dict[str, dict[str, Tensor]]  # task -> layer -> a_{t,k}
    sets: dict[str, dict[str, Tensor]]  # task -> layer -> I_t
    overlap: dict[tuple[str, str], dict[str, float]]  # (t, u) -> layer -> Jaccard
    chance: dict[tuple[str, str], dict[str, float]]
    examples: dict[str, int]

    def mean_overlap(self, pair: tuple[str, str]) -> float:
        """Mean Jaccard over the layers where it is defined."""
        values = [v for v in self.overlap[pair].values() if v == v]
        return sum(values) / len(values) if values else float("nan")

    def mean_chance(self, pair: tuple[str, str]) -> float:
        values = [v for v in self.chance[pair].values() if v == v]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        pairs = {f"{a}|{b}": {"overlap": self.overlap[(a, b)], "chance": self.chance[(a, b)],
                              "mean_overlap": self.mean_overlap((a, b)),
                              "mean_chance": self.mean_chance((a, b))}
                 for a, b in self.overlap}
        return {
            "tasks": list(self.tasks), "layers": list(self.layers), "share": self.share,
            "objective": self.objective, "examples": self.examples, "pairs": pairs,
            "set_sizes": {t: {layer: int(s.numel()) for layer, s in sets.items()}
                          for t, sets in self.sets.items()},
            "features": {layer: int(next(iter(self.mass.values()))[layer].numel())
                         for layer in self.layers},
        }


def task_feature_specialization(
    backbone: nn.Module | ResidentModel,
    tasks: Sequence[TaskProbe],
    vectors: Mapping[str, Mapping[str, Tensor]] | None = None,
    layers: Mapping[str, nn.Module] | Sequence[str] | None = None,
    share: float = DEFAULT_SHARE,
    objective: str = DEFAULT_OBJECTIVE,
    max_examples: int | None = DEFAULT_EXAMPLES,
    seed: int = 0,
) -> SpecializationResult:
    """TFS overlap for every pair of ``tasks`` at every scored layer (module docstring).

    With ``vectors`` (task name → weight-space task vector), task t is scored at
    θ0 + τ_t, moved in place and restored exactly; otherwise every task is scored at θ0.
    Tangent (``linear``) vectors are refused: their model's activations are not those of
    the backbone at θ0 + τ. Pass a ResidentModel to reuse its θ0 snapshots across calls.
    """
    if len(tasks) < 2:
        raise ValueError("task-feature specialization compares at least two tasks")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    resident = as_resident(backbone)
    backbone = resident.backbone
    if layers is None:
        layers = feature_layers(backbone)
    mass: dict[str, dict[str, Tensor]] = {}
    examples: dict[str, int] = {}
    for task in tasks:
        vector = None if vectors is None else vectors.get(task.name)
        if vector is not None:
            paradigm = vector.metadata.get("paradigm") if isinstance(vector, TaskVector) else None
            if paradigm == "linear":
                raise ValueError("TFS at θ0 + τ is defined for weight-space vectors; tangent "
                                 "(linear) vectors act on the linearised model, score θ0")
            with resident.edited((vector, 1.0)) as edited:
                mass[task.name] = attribution_mass(edited, task, layers, objective,
                                                   max_examples, seed=seed)
        else:
            mass[task.name] = attribution_mass(backbone, task, layers, objective,
                                               max_examples, seed=seed)
        examples[task.name] = len(task.sample(max_examples, seed)[1])
    layer_names = tuple(name for name in mass[names[0]] if all(name in m for m in mass.values()))
    sets = {t: {layer: specialized_set(mass[t][layer], share) for layer in layer_names}
            for t in names}
    overlap: dict[tuple[str, str], dict[str, float]] = {}
    chance: dict[tuple[str, str], dict[str, float]] = {}
    for a, b in itertools.combinations(names, 2):
        overlap[(a, b)] = {layer: jaccard(sets[a][layer], sets[b][layer]) for layer in layer_names}
        chance[(a, b)] = {layer: chance_jaccard(sets[a][layer].numel(), sets[b][layer].numel(),
                                                mass[a][layer].numel())
                          for layer in layer_names}
    return SpecializationResult(tuple(names), layer_names, share, objective, mass, sets,
                                overlap, chance, examples)
