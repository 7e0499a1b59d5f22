"""Addition and negation protocols on tiny models whose right answers are known by construction.

The backbone is a 4×4 linear map with θ0 = I. Task A reads features (0, 1), task B features
(2, 3). A planted update τ = E[1,0] (resp. E[3,2]) makes feature 1 = x1 + α·x0, so with
x0 = 1 the model predicts class 1 iff x1 > 1 − α: the data place the α at which each task is
solved, hence the α each protocol must choose.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.evaluation import (
    DEFAULT_ALPHAS,
    TaskEval,
    accuracy,
    addition,
    grid_accuracy,
    merge_vectors,
    negation,
    normalized_accuracy,
)
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.provenance import fingerprint_state

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _backbone() -> nn.Linear:
    net = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(4))
    return net


def _head(first: int) -> nn.Linear:
    """Logits = (feature[first], feature[first + 1])."""
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, first] = 1.0
        head.weight[1, first + 1] = 1.0
    return head


def _split(first: int, values: list[float], threshold: float) -> TensorDataset:
    """Inputs with x[first] = 1, x[first + 1] = v; label 1 iff v > threshold."""
    x = torch.zeros(len(values), 4)
    x[:, first] = 1.0
    x[:, first + 1] = torch.tensor(values)
    return TensorDataset(x, (x[:, first + 1] > threshold).long())


def _vector(net: nn.Module, row: int, col: int, sign: float = 1.0,
            paradigm: str = "full") -> TaskVector:
    tau = torch.zeros(4, 4)
    tau[row, col] = sign
    meta = {"paradigm": paradigm, "base_fingerprint": fingerprint_state(net.state_dict()),
            "task": f"t{row}"}
    return TaskVector({"weight": tau}, meta)


# ----------------------------------------------------------------------------- addition
def _addition_setup(net: nn.Module, paradigm: str = "full"):
    tasks = {
        # A: val solved only for 1 − α ∈ (0.475, 0.525), i.e. α = 0.5 on the 21-point grid;
        # A's test split would prefer α = 0.8 — it must not influence the choice
        "A": TaskEval("A", _head(0), _split(0, [0.2, 0.3, 0.475, 0.525, 0.8, 0.9], 0.5),
                      _split(0, [0.1, 0.3, 0.4, 0.6, 0.7], 0.2)),
        # B: val solved for α ∈ {0.45, 0.5, 0.55}; alone it would tie, with A it must be 0.5
        "B": TaskEval("B", _head(2), _split(2, [0.1, 0.42, 0.58, 0.9], 0.5),
                      _split(2, [0.1, 0.42, 0.58, 0.9], 0.5)),
    }
    vectors = {"A": _vector(net, 1, 0, paradigm=paradigm), "B": _vector(net, 3, 2, paradigm=paradigm)}
    finetuned = {"A": {"val": 1.0, "test": 0.8}, "B": {"val": 0.8, "test": 1.0}}
    return tasks, vectors, finetuned


@pytest.mark.parametrize("paradigm", ["full", "linear"])
def test_addition_picks_the_planted_alpha_on_validation(paradigm: str) -> None:
    net = _backbone()
    tasks, vectors, finetuned = _addition_setup(net, paradigm)
    result = addition(net, tasks, vectors, finetuned)
    assert result.alpha == 0.5
    assert result.paradigm == paradigm
    curve = result.val_curve
    assert curve["alphas"] == list(DEFAULT_ALPHAS)
    assert curve["per_task"]["A"][10] == 1.0 and curve["per_task"]["A"][9] < 1.0
    # the curve is the mean normalized val accuracy, exactly as documented
    for i in range(21):
        expected = (curve["per_task"]["A"][i] / 1.0 + curve["per_task"]["B"][i] / 0.8) / 2
        assert curve["norm"][i] == pytest.approx(expected)
        assert curve["abs"][i] == pytest.approx((curve["per_task"]["A"][i]
                                                 + curve["per_task"]["B"][i]) / 2)
    assert result.val_norm == max(curve["norm"]) == pytest.approx((1.0 + 1.0 / 0.8) / 2)
    assert result.val_abs == 1.0
    # test at α = 0.5: A predicts 1 iff v > 0.5 → [0, 0, 0, 1, 1] vs labels [0, 1, 1, 1, 1]
    assert result.per_task["A"]["test"] == pytest.approx(0.6)
    assert result.per_task["A"]["test_norm"] == pytest.approx(0.6 / 0.8)
    assert result.per_task["B"] == {"val": 1.0, "val_norm": 1.0 / 0.8, "test": 1.0,
                                    "test_norm": 1.0}
    assert result.test_abs == pytest.approx(0.8)
    assert result.test_norm == pytest.approx((0.75 + 1.0) / 2)
    assert torch.equal(net.weight, torch.eye(4))  # θ0 untouched afterwards
    record = json.loads(json.dumps(result.to_dict()))
    assert record["alpha"] == 0.5 and len(record["val_curve"]["norm"]) == 21


def test_normalized_accuracy_definition() -> None:
    assert normalized_accuracy(0.6, 0.8) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        normalized_accuracy(0.5, 0.0)


def test_addition_rejects_mismatched_vectors_before_any_work() -> None:
    net = _backbone()
    tasks, vectors, finetuned = _addition_setup(net)
    wrong_base = TaskVector(dict(vectors["B"]), {**vectors["B"].metadata,
                                                  "base_fingerprint": "0000000000000000"})
    with pytest.raises(TaskVectorMismatch, match="base_fingerprint"):
        addition(net, tasks, {**vectors, "B": wrong_base}, finetuned)
    tangent = TaskVector(dict(vectors["B"]), {**vectors["B"].metadata, "paradigm": "linear"})
    with pytest.raises(TaskVectorMismatch, match="paradigm"):
        addition(net, tasks, {**vectors, "B": tangent}, finetuned)
    with pytest.raises(ValueError, match="'B'"):
        addition(net, tasks, {"A": vectors["A"]}, finetuned)
    with pytest.raises(ValueError, match="fine-tuned"):
        addition(net, tasks, vectors, {"A": finetuned["A"]})
    with pytest.raises(ValueError, match="finite"):
        addition(net, tasks, vectors, finetuned, alphas=[0.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        addition(net, tasks, vectors, finetuned, alphas=[])
    empty = TensorDataset(torch.empty(0, 4), torch.empty(0, dtype=torch.int64))
    broken = {**tasks, "B": TaskEval("B", tasks["B"].head, tasks["B"].val, empty)}
    with pytest.raises(ValueError, match="task 'B', test split"):
        addition(net, broken, vectors, finetuned)


def _finetuned_pair() -> tuple[nn.Module, nn.Module, TensorDataset, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
    head = nn.Linear(8, 4)
    inputs = torch.randn(200, 6)
    data = TensorDataset(inputs, (inputs @ torch.randn(6, 4)).argmax(-1))  # learnable labels
    finetuned = copy.deepcopy(base)
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.5)
    for _ in range(60):
        loss = nn.functional.cross_entropy(head(finetuned(data.tensors[0])), data.tensors[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return base, finetuned, data, head


@pytest.mark.parametrize("registry", ["available", "absent"])
def test_single_vector_task_arithmetic_at_one_is_the_finetuned_model(
        registry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if registry == "absent":
        monkeypatch.setitem(sys.modules, "orthoreg.merging", None)  # import → ImportError
    else:
        pytest.importorskip("orthoreg.merging", reason="merging registry not written yet")
        from orthoreg import merging
        if not hasattr(merging, "merge"):
            pytest.skip("merging registry not exported yet")
    base, finetuned, data, head = _finetuned_pair()
    vector = TaskVector.from_state_dicts(base.state_dict(), finetuned.state_dict(),
                                         metadata={"paradigm": "full", "task": "T"})
    merged = merge_vectors("task_arithmetic", [vector])
    ft_acc = accuracy(finetuned, head, data)
    assert ft_acc > accuracy(base, head, data)  # fine-tuning did something
    task = TaskEval("T", head, data, data)
    result = addition(base, {"T": task}, {"T": vector}, {"T": {"val": ft_acc, "test": ft_acc}},
                      alphas=[1.0])
    assert result.per_task["T"]["test"] == ft_acc
    assert result.per_task["T"]["test_norm"] == 1.0
    if registry == "available":  # the registry's resolved hyper-parameters are recorded
        assert result.merge_params == {"weights": None}
    assert grid_accuracy(base, head, data, merged, [1.0]) == [ft_acc]


# ----------------------------------------------------------------------------- negation
def _negation_tasks() -> tuple[TaskEval, TaskEval]:
    """θ0 − α·τ with τ = −E[1,0] − E[3,2]: a value v is misread as class 1 once α > 1 − v."""
    # target val: the label-0 points fall (accuracy 1, 5/6, 4/6, 3/6, 2/6) at α > .13, .33, .53, .8
    target_val = _split(0, [0.2, 0.47, 0.67, 0.87, 1.5, 2.0], 1.0)
    target_test = _split(0, [0.5, 0.95, 1.5, 2.0], 1.0)
    # control val: accuracy 1 for α ≤ .35, 0.9 up to .7, 0.8 up to .9, then 0.7
    control_val = _split(2, [2.0] * 7 + [0.62, 0.3, 0.1], 1.0)
    control_test = _split(2, [2.0, 2.0, 0.75, 0.05], 1.0)
    return (TaskEval("target", _head(0), target_val, target_test),
            TaskEval("control", _head(2), control_val, control_test))


def _negation_vector(net: nn.Module, paradigm: str = "full") -> TaskVector:
    tau = torch.zeros(4, 4)
    tau[1, 0] = tau[3, 2] = -1.0
    return TaskVector({"weight": tau}, {"paradigm": paradigm,
                                        "base_fingerprint": fingerprint_state(net.state_dict())})


@pytest.mark.parametrize("paradigm", ["full", "linear"])
def test_negation_respects_the_control_constraint(paradigm: str) -> None:
    net = _backbone()
    target, control = _negation_tasks()
    result = negation(net, target, control, _negation_vector(net, paradigm))
    assert result.pretrained == {"target": {"val": 1.0, "test": 1.0},
                                 "control": {"val": 1.0, "test": 1.0}}
    by_threshold = {c.threshold: c for c in result.thresholds}
    # 0.95: control must stay at 1.0 → α ≤ 0.35, where the target is lowest at α = 0.35
    assert by_threshold[0.95].alpha == 0.35 and by_threshold[0.95].feasible
    assert by_threshold[0.95].val_target == pytest.approx(4 / 6)
    # 0.90: α ≤ 0.7; the target reaches 3/6 from α = 0.55 (ties → smaller α)
    assert by_threshold[0.90].alpha == 0.55
    assert by_threshold[0.90].val_control == pytest.approx(0.9)
    # 0.80: α ≤ 0.9; the target reaches 2/6 from α = 0.85
    assert by_threshold[0.80].alpha == 0.85
    # test splits at the chosen α: target v > 1 − α misread; control the same
    for choice in result.thresholds:
        misread = [v > 1 - choice.alpha for v in (0.5, 0.95, 0.75, 0.05)]
        assert choice.test_target == (4 - misread[0] - misread[1]) / 4
        assert choice.test_control == (4 - misread[2] - misread[3]) / 4
    assert [c.test_target for c in result.thresholds] == [0.75, 0.5, 0.5]
    assert result.val_curve["alphas"][0] == 0.0 and len(result.val_curve["alphas"]) == 21
    assert result.val_curve["target"][0] == result.val_curve["control"][0] == 1.0
    assert torch.equal(net.weight, torch.eye(4))
    record = json.loads(json.dumps(result.to_dict()))
    assert record["thresholds"][0]["threshold"] == 0.95


def test_negation_reports_infeasible_explicitly() -> None:
    net = _backbone()
    target, _ = _negation_tasks()
    # a control that loses 2 of its 5 examples as soon as α > 0.03: 0.6 of pretrained at best
    fragile = TaskEval("fragile", _head(2), _split(2, [2.0, 2.0, 2.0, 0.97, 0.98], 1.0),
                       _split(2, [2.0, 0.5], 1.0))
    result = negation(net, target, fragile, _negation_vector(net), thresholds=(0.95, 0.5))
    strict, loose = result.thresholds
    assert (strict.feasible, strict.alpha) == (False, 0.0)
    assert strict.val_target == 1.0 and strict.test_target == result.pretrained["target"]["test"]
    assert loose.feasible and loose.alpha > 0
    assert result.to_dict()["thresholds"][0]["feasible"] is False


def test_negation_rejects_bad_input() -> None:
    net = _backbone()
    target, control = _negation_tasks()
    vector = _negation_vector(net)
    with pytest.raises(ValueError, match="thresholds"):
        negation(net, target, control, vector, thresholds=(1.5,))
    with pytest.raises(ValueError, match="finite"):
        negation(net, target, control, vector, alphas=[float("inf")])
    with pytest.raises(TaskVectorMismatch, match="base model"):
        negation(_backbone().double(), target, control,
                 TaskVector(dict(vector), {**vector.metadata, "base_fingerprint": "x"}))
