"""Task-feature specialization: overlap 0 for block-diagonal features, 1 for identical tasks,
attributions equal to hand-computed gradients, hooks and weights left as they were."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthoreg.diagnostics import (
    OBJECTIVES,
    TaskProbe,
    attribution_mass,
    chance_jaccard,
    feature_layers,
    jaccard,
    specialized_set,
    task_feature_specialization,
)
from orthoreg.taskvector import TaskVector

BLOCKS = (slice(0, 3), slice(3, 6))


def block_mask() -> Tensor:
    mask = torch.zeros(6, 6)
    for rows in BLOCKS:
        mask[rows, rows] = 1.0
    return mask


class BlockFeatures(nn.Module):
    """Two block-diagonal linear layers with a GELU: features of block k come from inputs
    of block k only."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        with torch.no_grad():
            self.first.weight.mul_(block_mask())
            self.second.weight.mul_(block_mask())

    def forward(self, x: Tensor) -> Tensor:
        return self.second(F.gelu(self.first(x)))


def head_on(block: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(6, 3)
    keep = torch.zeros(6)
    keep[BLOCKS[block]] = 1.0
    with torch.no_grad():
        head.weight.mul_(keep)
    return head


def data(seed: int, n: int = 50) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return BlockFeatures().eval()


def test_block_diagonal_features_give_zero_overlap(model: nn.Module) -> None:
    probes = [TaskProbe("one", head_on(0, 1), data(2)), TaskProbe("two", head_on(1, 3), data(4))]
    result = task_feature_specialization(model, probes)
    assert result.layers == ("first", "second")
    for layer in result.layers:
        assert result.overlap[("one", "two")][layer] == 0.0
        assert set(result.sets["one"][layer].tolist()) <= {0, 1, 2}
        assert set(result.sets["two"][layer].tolist()) <= {3, 4, 5}
        assert result.chance[("one", "two")][layer] > 0  # and chance is not zero
    assert result.mean_overlap(("one", "two")) == 0.0


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_identical_tasks_give_full_overlap(model: nn.Module, objective: str) -> None:
    head, inputs = head_on(0, 1), data(2)
    probes = [TaskProbe("a", head, inputs), TaskProbe("b", head, inputs)]
    result = task_feature_specialization(model, probes, objective=objective)
    assert all(v == 1.0 for v in result.overlap[("a", "b")].values())
    assert result.mean_overlap(("a", "b")) == 1.0


def test_attribution_of_a_linear_layer_matches_autograd(model: nn.Module) -> None:
    """a_k = mean over examples of |∂ logit_y / ∂ x_k| at the first layer (its input is x)."""
    head = head_on(1, 5)
    x, y = data(6)
    mass = attribution_mass(model, TaskProbe("t", head, (x, y)), ["first"], max_examples=None,
                            batch_size=7)
    leaf = x.clone().requires_grad_(True)
    logits = head(model(leaf))
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), leaf)
    torch.testing.assert_close(mass["first"], grad.abs().double().mean(0), rtol=1e-6, atol=1e-9)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pointwise = nn.Conv2d(5, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(torch.tanh(self.conv(x))).mean(dim=(2, 3))


def test_conv_attribution_sums_spatial_positions_per_channel() -> None:
    torch.manual_seed(0)
    net = ConvNet().eval()
    head = nn.Linear(4, 3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, 6, 6, generator=generator)
    y = torch.randint(0, 3, (9,), generator=generator)
    mass = attribution_mass(net, TaskProbe("t", head, (x, y)), objective="loss",
                            max_examples=None)
    assert set(mass) == {"conv", "pointwise"} == set(feature_layers(net))
    assert mass["conv"].shape == (3,) and mass["pointwise"].shape == (5,)
    hidden = torch.tanh(net.conv(x)).detach().requires_grad_(True)
    loss = F.cross_entropy(head(net.pointwise(hidden).mean(dim=(2, 3))), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    expected = grad.abs().double().sum(dim=(2, 3)).mean(0)
    torch.testing.assert_close(mass["pointwise"], expected, rtol=1e-6, atol=1e-9)


def test_specialized_set_is_the_smallest_prefix_holding_the_share() -> None:
    mass = torch.tensor([1.0, 5.0, 1.0, 3.0])
    assert specialized_set(mass, 0.8).tolist() == [1, 3]  # 5 + 3 = 8 of 10
    assert specialized_set(mass, 0.81).tolist() == [0, 1, 3]  # tie 1 = 1 broken by index
    assert specialized_set(mass, 1.0).tolist() == [0, 1, 2, 3]
    assert specialized_set(torch.zeros(4)).numel() == 0
    with pytest.raises(ValueError):
        specialized_set(mass, 0.0)


def test_jaccard_and_chance() -> None:
    assert jaccard(torch.tensor([0, 1]), torch.tensor([1, 2])) == 1 / 3
    assert math.isnan(jaccard(torch.tensor([]), torch.tensor([])))
    assert chance_jaccard(10, 10, 10) == 1.0
    assert math.isclose(chance_jaccard(5, 5, 10), 2.5 / 7.5)


def test_weights_hooks_and_modes_are_left_as_they_were(model: nn.Module) -> None:
    model.train()
    probes = [TaskProbe("one", head_on(0, 1), data(2)), TaskProbe("two", head_on(1, 3), data(4))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(9)
    vectors = {name: TaskVector({k: torch.randn(v.shape, generator=generator)
                                 for k, v in model.named_parameters()}, {"paradigm": "full"})
               for name in ("one", "two")}
    at_theta0 = task_feature_specialization(model, probes)
    moved = task_feature_specialization(model, probes, vectors=vectors)
    assert not torch.equal(at_theta0.mass["one"]["first"], moved.mass["one"]["first"])
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs(model: nn.Module) -> None:
    probe = TaskProbe("one", head_on(0, 1), data(2))
    with pytest.raises(ValueError, match="at least two"):
        task_feature_specialization(model, [probe])
    with pytest.raises(ValueError, match="objective"):
        attribution_mass(model, probe, objective="nope")
    with pytest.raises(KeyError, match="nothing"):
        attribution_mass(model, probe, ["nothing"])
    linear = {"one": TaskVector({k: torch.zeros_like(v) for k, v in model.named_parameters()},
                                {"paradigm": "linear"})}
    with pytest.raises(ValueError, match="tangent"):
        task_feature_specialization(model, [probe, TaskProbe("two", head_on(1, 3), data(4))],
                                    vectors=linear)
