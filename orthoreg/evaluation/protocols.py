"""The task-arithmetic protocols of DESIGN.md §2: addition and negation.

Both follow Ilharco et al. (2023) as used by OrthoReg (Liu et al. 2026):

- **addition** — θ0 + α·merge(τ_1..τ_T); α on the merge method's reference grid
  (``orthoreg.merging.default_alphas``: task arithmetic's 21 points in [0, 1]; 0.1…3.0 for
  the means and re-scaled merges) unless given, chosen on the *validation* splits by the
  mean normalized accuracy, where
  normalized_t = acc_t(merged) / acc_t(single-task fine-tuned model of the same paradigm);
  test absolute and normalized accuracies are reported at that α.
- **negation** — θ0 − α·τ_t; per threshold q ∈ {0.95, 0.90, 0.80}, α minimises the target
  task's validation accuracy subject to control validation accuracy ≥ q × the pretrained
  model's; test target and control accuracies are reported at that α.

Test splits are only ever evaluated at coefficients already chosen on validation. Every
input is validated — vectors against each other and the backbone, the grid, the data,
the fine-tuned reference accuracies — before the first forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from orthoreg.evaluation.accuracy import EvalBatches, model_device, to_jsonable
from orthoreg.evaluation.grid import (
    check_vectors,
    coefficient_grid,
    grid_accuracy,
    resolve_paradigm,
)
from orthoreg.evaluation.resident import ResidentModel, as_resident
from orthoreg.taskvector import TaskVector

#: the 21-point grid in [0, 1] of DESIGN.md §2
DEFAULT_ALPHAS: tuple[float, ...] = tuple(i / 20 for i in range(21))
#: control-accuracy retention levels of the negation protocol
NEGATION_THRESHOLDS: tuple[float, ...] = (0.95, 0.90, 0.80)
#: slack for comparing accuracies (ratios of counts) with a threshold × an accuracy
_TOLERANCE = 1e-12


@dataclass(frozen=True)
class TaskEval:
    """What evaluating one task needs: its frozen head and its val and test splits."""

    name: str
    head: nn.Module
    val: Dataset | tuple[Tensor, Tensor]
    test: Dataset | tuple[Tensor, Tensor]

    def batches(self, device: Any, batch_size: int) -> tuple[EvalBatches, EvalBatches]:
        """Both splits prepared once (this also rejects an empty split, naming the task)."""
        prepared = []
        for split in ("val", "test"):
            try:
                prepared.append(EvalBatches(getattr(self, split), batch_size, device))
            except ValueError as error:
                raise type(error)(f"task {self.name!r}, {split} split: {error}") from error
        return prepared[0], prepared[1]


def normalized_accuracy(accuracy: float, finetuned_accuracy: float) -> float:
    """acc_t(merged) / acc_t(single-task fine-tuned, same paradigm) — DESIGN.md §2.

    It measures how much of what fine-tuning achieved on t survives the merge (1 = all);
    dividing by the *same paradigm's* fine-tuned accuracy keeps paradigms comparable.
    """
    if not (math.isfinite(finetuned_accuracy) and finetuned_accuracy > 0):
        raise ValueError(f"fine-tuned accuracy must be > 0, got {finetuned_accuracy!r}")
    return accuracy / finetuned_accuracy


def merge_vectors(method: str, vectors: Sequence[TaskVector],
                  params: Mapping[str, Any] | None = None) -> TaskVector:
    """The merged task vector, through the ``orthoreg.merging`` registry.

    Imported lazily (evaluation sits below merging in the data flow only by call, not by
    import); plain task arithmetic, Σ_t τ_t, needs no registry and is computed here if the
    registry is unavailable.
    """
    try:
        from orthoreg.merging import merge
    except ImportError:
        if method == "task_arithmetic" and not params:
            return sum(vectors)  # type: ignore[return-value]
        raise
    return merge(method, list(vectors), **dict(params or {}))


# ----------------------------------------------------------------------------- addition
@dataclass
class AdditionResult:
    """Task addition at the α chosen on validation, with the whole validation curve.

    ``*_abs`` are mean absolute accuracies over tasks, ``*_norm`` mean normalized ones, at
    the chosen α; ``per_task[t]`` holds ``val``, ``val_norm``, ``test``, ``test_norm``;
    ``val_curve`` holds the selection curve for plotting: ``alphas``, ``norm`` (mean
    normalized val accuracy — the criterion), ``abs`` and ``per_task`` absolute val curves.
    """

    paradigm: str
    merge: str
    merge_params: dict[str, Any]
    alpha: float
    val_abs: float
    val_norm: float
    test_abs: float
    test_norm: float
    per_task: dict[str, dict[str, float]]
    val_curve: dict[str, Any]
    finetuned: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def _check_finetuned(names: Sequence[str],
                     finetuned_acc: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        if name not in finetuned_acc:
            raise ValueError(f"no fine-tuned accuracy for task {name!r}")
        record = finetuned_acc[name]
        values = {}
        for split in ("val", "test"):
            if split not in record:
                raise ValueError(f"fine-tuned accuracy of task {name!r} lacks {split!r}")
            value = float(record[split])
            if not (math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"fine-tuned {split} accuracy of task {name!r} must be in "
                                 f"(0, 1], got {record[split]!r}")
            values[split] = value
        out[name] = values
    return out


def _best_index(alphas: Sequence[float], scores: Sequence[float]) -> int:
    """argmax of the score; ties go to the smallest |α| (the least edited model)."""
    return min(range(len(alphas)), key=lambda i: (-scores[i], abs(alphas[i]), alphas[i]))


def addition(
    backbone: nn.Module | ResidentModel,
    tasks: Mapping[str, TaskEval],
    vectors: Mapping[str, TaskVector],
    finetuned_acc: Mapping[str, Mapping[str, float]],
    alphas: Sequence[float] | Tensor | None = None,
    merge: str = "task_arithmetic",
    merge_params: Mapping[str, Any] | None = None,
    paradigm: str | None = None,
    batch_size: int = 256,
) -> AdditionResult:
    """Task addition θ0 + α·merge(τ) with α chosen on validation (DESIGN.md §2).

    ``finetuned_acc[t] = {"val": ..., "test": ...}`` are the single-task fine-tuned
    accuracies of the same paradigm, the denominators of the normalized accuracy.
    ``alphas=None`` searches the merge method's reference grid
    (:func:`orthoreg.merging.default_alphas`: 0…1 for sums, 0.1…3.0 for TIES, TSV-M, Iso-C).
    """
    if alphas is None:
        from orthoreg.merging import default_alphas

        alphas = default_alphas(merge)
    names = list(tasks)
    if not names:
        raise ValueError("addition needs at least one task")
    if set(vectors) != set(names):
        missing = sorted(set(names) - set(vectors)) or sorted(set(vectors) - set(names))
        raise ValueError(f"tasks and task vectors differ: {missing[0]!r} is not in both")
    finetuned = _check_finetuned(names, finetuned_acc)
    vector_list = check_vectors([vectors[name] for name in names])
    paradigm = resolve_paradigm(vector_list, paradigm)
    grid = coefficient_grid(alphas)[:, 0].tolist()
    resident = as_resident(backbone)
    for vector in vector_list:
        resident.check(vector)
    device = model_device(resident.backbone)
    splits = {name: tasks[name].batches(device, batch_size) for name in names}

    # moved to the backbone's device once, not once per task and split
    merged = resident.localize(merge_vectors(merge, vector_list, merge_params))
    val_accuracy = {
        name: grid_accuracy(resident, tasks[name].head, splits[name][0], merged, grid, paradigm)
        for name in names
    }
    val_normalized = {
        name: [normalized_accuracy(acc, finetuned[name]["val"]) for acc in val_accuracy[name]]
        for name in names
    }
    curve = [_mean(val_normalized[n][i] for n in names) for i in range(len(grid))]
    best = _best_index(grid, curve)
    alpha = grid[best]
    per_task = {}
    for name in names:
        test = grid_accuracy(resident, tasks[name].head, splits[name][1], merged, [alpha],
                             paradigm)[0]
        per_task[name] = {"val": val_accuracy[name][best], "val_norm": val_normalized[name][best],
                          "test": test,
                          "test_norm": normalized_accuracy(test, finetuned[name]["test"])}
    return AdditionResult(
        paradigm=paradigm,
        merge=merge,
        # the registry records the resolved hyper-parameters, defaults included
        merge_params=dict(merged.metadata.get("merge", {}).get("params", merge_params or {})),
        alpha=alpha,
        val_abs=_mean(per_task[n]["val"] for n in names),
        val_norm=curve[best],
        test_abs=_mean(per_task[n]["test"] for n in names),
        test_norm=_mean(per_task[n]["test_norm"] for n in names),
        per_task=per_task,
        val_curve={"alphas": grid, "norm": curve,
                   "abs": [_mean(val_accuracy[n][i] for n in names) for i in range(len(grid))],
                   "per_task": val_accuracy},
        finetuned=finetuned,
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- negation
@dataclass
class NegationChoice:
    """The coefficient chosen for one control threshold, and what it gives on test.

    ``feasible`` is False when no α ≠ 0 keeps the control accuracy above the threshold;
    then α = 0 (the pretrained model) is reported, never a silently violating α.
    """

    threshold: float
    feasible: bool
    alpha: float
    val_target: float
    val_control: float
    test_target: float
    test_control: float


@dataclass
class NegationResult:
    """Task negation θ0 − α·τ of ``target``, constrained by ``control``'s accuracy.

    ``val_curve`` holds ``alphas`` (α = 0, the pretrained model, first), ``target`` and
    ``control`` validation accuracies; ``pretrained`` the α = 0 accuracies on both splits.
    """

    target: str
    control: str
    paradigm: str
    pretrained: dict[str, dict[str, float]]  # {"target"|"control": {"val", "test"}}
    thresholds: list[NegationChoice]
    val_curve: dict[str, list[float]]

    def choice(self, threshold: float) -> NegationChoice:
        for choice in self.thresholds:
            if math.isclose(choice.threshold, threshold):
                return choice
        raise KeyError(f"no choice for threshold {threshold}")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def negation(
    backbone: nn.Module | ResidentModel,
    target: TaskEval,
    control: TaskEval,
    vector: TaskVector,
    alphas: Sequence[float] | Tensor = DEFAULT_ALPHAS,
    thresholds: Sequence[float] = NEGATION_THRESHOLDS,
    paradigm: str | None = None,
    batch_size: int = 256,
) -> NegationResult:
    """Forget ``target`` by θ0 − α·τ while ``control`` keeps ≥ q × its pretrained accuracy.

    For each threshold q, α minimises target val accuracy among grid points whose control
    val accuracy is ≥ q × the pretrained control val accuracy (α = 0 always qualifies; ties
    go to higher control accuracy, then to the smaller α).
    """
    vector_list = check_vectors([vector])
    paradigm = resolve_paradigm(vector_list, paradigm)
    given = coefficient_grid(alphas)[:, 0].tolist()
    levels = [float(q) for q in thresholds]
    if not levels or not all(0 < q <= 1 for q in levels):  # NaN fails too
        raise ValueError(f"thresholds must lie in (0, 1], got {list(thresholds)!r}")
    resident = as_resident(backbone)
    resident.check(vector_list[0])  # before any data is prepared
    device = model_device(resident.backbone)
    target_val_b, target_test_b = target.batches(device, batch_size)
    control_val_b, control_test_b = control.batches(device, batch_size)

    points = [0.0, *(a for a in dict.fromkeys(given) if a != 0.0)]
    negated = [-a for a in points]
    vec = resident.localize(vector_list[0])
    target_val = grid_accuracy(resident, target.head, target_val_b, vec, negated, paradigm)
    control_val = grid_accuracy(resident, control.head, control_val_b, vec, negated, paradigm)

    chosen = []
    for q in levels:
        bound = q * control_val[0] - _TOLERANCE
        allowed = [i for i in range(len(points)) if control_val[i] >= bound]
        best = min(allowed, key=lambda i: (target_val[i], -control_val[i], abs(points[i])))
        chosen.append((q, any(i != 0 for i in allowed), best))

    test_points = sorted({0, *(best for _, _, best in chosen)})
    test_negated = [-points[i] for i in test_points]
    target_test = dict(zip(test_points, grid_accuracy(
        resident, target.head, target_test_b, vec, test_negated, paradigm)))
    control_test = dict(zip(test_points, grid_accuracy(
        resident, control.head, control_test_b, vec, test_negated, paradigm)))

    choices = [
        NegationChoice(threshold=q, feasible=feasible, alpha=points[best],
                       val_target=target_val[best], val_control=control_val[best],
                       test_target=target_test[best], test_control=control_test[best])
        for q, feasible, best in chosen
    ]
    return NegationResult(
        target=target.name,
        control=control.name,
        paradigm=paradigm,
        pretrained={"target": {"val": target_val[0], "test": target_test[0]},
                    "control": {"val": control_val[0], "test": control_test[0]}},
        thresholds=choices,
        val_curve={"alphas": points, "target": target_val, "control": control_val},
    )
