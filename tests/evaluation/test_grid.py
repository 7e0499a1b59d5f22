"""The coefficient grid: one JVP per batch for tangent vectors, dispatch, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.evaluation import (
    GRID_PREDICTORS,
    LinearGrid,
    ResidentModel,
    grid_accuracy,
    grid_predictions,
)
from orthoreg.paradigms import Linear, LinearizedModel
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.provenance import fingerprint_state


class CosineHead(nn.Module):
    """A CLIP-style zero-shot head: logits = scale · cos(features, class embeddings)."""

    def __init__(self, dim: int, classes: int, scale: float = 30.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10), nn.Tanh(), nn.Linear(10, 8),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _tangent_vector(net: nn.Module, seed: int, scale: float = 0.5) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: scale * torch.randn(p.shape, generator=generator)
               for n, p in net.named_parameters()}
    meta = {"paradigm": "linear", "base_fingerprint": fingerprint_state(net.state_dict())}
    return TaskVector(tensors, meta)


ALPHAS = [i / 20 for i in range(21)]

# torch's first forward-mode AD call scripts its JVP decompositions (torch-internal warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.mark.parametrize("head_kind", ["linear", "cosine"])
def test_jvp_grid_equals_per_alpha_linearized_model(head_kind: str) -> None:
    net = _backbone()
    tau = _tangent_vector(net, 1)
    head = nn.Linear(8, 5) if head_kind == "linear" else CosineHead(8, 5)
    x = torch.randn(12, 3, 6, 6)

    reference_model = LinearizedModel(copy.deepcopy(net), list(tau.keys())).eval()
    with torch.no_grad():
        expected = []
        for alpha in ALPHAS:
            reference_model.set_delta(tau, alpha)
            expected.append(head(reference_model(x)))
        expected = torch.stack(expected)

    linearized = LinearizedModel(copy.deepcopy(net), list(tau.keys())).eval()
    with torch.no_grad():
        got = LinearGrid(linearized, head, [tau], ALPHAS).logits(x)
    assert got.shape == (21, 12, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if head_kind == "cosine":  # the point of applying the head per α: logits are not linear in α
        midpoint = 0.5 * (got[0] + got[-1])
        assert (got[10] - midpoint).abs().max() > 1e-2


def test_grid_predictions_use_one_jvp_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _backbone()
    tau = _tangent_vector(net, 2)
    head = CosineHead(8, 4)
    data = TensorDataset(torch.randn(30, 3, 6, 6), torch.randint(0, 4, (30,)))
    calls = []
    original = LinearizedModel.value_and_jvp

    def counting(self, x, tangent):
        calls.append(len(x))
        return original(self, x, tangent)

    monkeypatch.setattr(LinearizedModel, "value_and_jvp", counting)
    got = grid_predictions(net, head, data, tau, ALPHAS, batch_size=8)
    assert calls == [8, 8, 8, 6]  # 4 batches, one JVP each, for all 21 coefficients

    monkeypatch.setattr(LinearizedModel, "value_and_jvp", original)
    for alpha, row in zip(ALPHAS, got):
        model = Linear().edited(copy.deepcopy(net), tau, alpha).eval()
        with torch.no_grad():
            assert torch.equal(row, head(model(data.tensors[0])).argmax(-1))


def test_linear_grid_leaves_backbone_untouched() -> None:
    net = _backbone()
    net[5].weight.requires_grad_(True)
    net[1].train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    data = TensorDataset(torch.randn(10, 3, 6, 6), torch.randint(0, 8, (10,)))
    grid_accuracy(net, nn.Identity(), data, _tangent_vector(net, 3), [0.0, 1.0])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in net.named_parameters()}
    assert net[1].training


def test_two_vector_tangent_grid_is_exact_in_both_coefficients() -> None:
    net = _backbone()
    tau1, tau2 = _tangent_vector(net, 4), _tangent_vector(net, 5)
    head = CosineHead(8, 3)
    x = torch.randn(9, 3, 6, 6)
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.3, 0.6], [-0.5, 1.0]])
    linearized = LinearizedModel(copy.deepcopy(net), list(tau1.keys())).eval()
    with torch.no_grad():
        got = LinearGrid(linearized, head, [tau1, tau2], points).logits(x)
        for row, (a1, a2) in zip(got, points.tolist()):
            linearized.set_delta(tau1 * a1 + tau2 * a2)
            torch.testing.assert_close(row, head(linearized(x)), rtol=1e-5, atol=1e-5)


def test_paradigms_dispatch_through_the_registry() -> None:
    assert GRID_PREDICTORS["full"] is GRID_PREDICTORS["partial"] is GRID_PREDICTORS["lora"]
    assert GRID_PREDICTORS["linear"] is not GRID_PREDICTORS["full"]


# ----------------------------------------------------------------------------- bad input
class ExplodingHead(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the head ran: validation came too late")


def _data(n: int = 6) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 6, 6), torch.randint(0, 8, (n,)))


def test_mismatched_vectors_raise_before_any_work() -> None:
    net = _backbone()
    tau = _tangent_vector(net, 1)
    other_base = TaskVector(dict(tau), {**tau.metadata, "base_fingerprint": "feedfacefeedface"})
    other_paradigm = TaskVector(dict(tau), {**tau.metadata, "paradigm": "full"})
    no_meta = TaskVector(dict(tau))
    head = ExplodingHead()
    with pytest.raises(TaskVectorMismatch, match="base_fingerprint"):
        grid_predictions(net, head, _data(), [no_meta, tau, other_base], [[1, 1, 1]])
    with pytest.raises(TaskVectorMismatch, match="paradigm"):
        grid_predictions(net, head, _data(), [tau, other_paradigm], [[1, 1]])
    with pytest.raises(TaskVectorMismatch, match="requested"):
        grid_predictions(net, head, _data(), tau, [1.0], paradigm="full")
    with pytest.raises(TaskVectorMismatch, match="base model"):
        grid_predictions(net, head, _data(), other_base, [1.0])
    with pytest.raises(ValueError, match="paradigm="):
        grid_predictions(net, head, _data(), no_meta, [1.0])


@pytest.mark.parametrize("alphas", [[], [float("nan")], [0.0, float("inf")]])
def test_bad_alphas_raise(alphas: list[float]) -> None:
    net = _backbone()
    with pytest.raises(ValueError):
        grid_accuracy(net, ExplodingHead(), _data(), _tangent_vector(net, 1), alphas)


def test_empty_dataset_raises() -> None:
    net = _backbone()
    empty = TensorDataset(torch.empty(0, 3, 6, 6), torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        grid_accuracy(net, ExplodingHead(), empty, _tangent_vector(net, 1), [0.0])


def test_resident_model_can_be_shared_across_grids() -> None:
    net = _backbone()
    resident = ResidentModel(net)
    tau = _tangent_vector(net, 1, scale=2.0)
    weight_space = TaskVector(dict(tau), {**tau.metadata, "paradigm": "full"})
    data = _data(40)
    first = grid_accuracy(resident, nn.Identity(), data, weight_space, [0.0, 0.5, 1.0])
    tangent = grid_accuracy(resident, nn.Identity(), data, tau, [0.0, 0.5, 1.0])
    again = grid_accuracy(resident, nn.Identity(), data, weight_space, [0.0, 0.5, 1.0])
    assert first == again
    assert first[0] == tangent[0]  # α = 0 is θ0 in both spaces
    assert first != tangent  # a large vector: the tangent model is not the non-linear one
