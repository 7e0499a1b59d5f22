"""ResidentModel: θ0 + Σ α·τ in place, validated first, restored bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.evaluation import ResidentModel, accuracy, grid_accuracy, grid_predictions
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.provenance import fingerprint_state


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6),
    )
    with torch.no_grad():  # non-trivial running statistics, as a pretrained model has
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _vector(net: nn.Module, seed: int, scale: float = 0.3, paradigm: str = "full") -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: scale * torch.randn(p.shape, generator=generator)
               for n, p in net.named_parameters()}
    meta = {"paradigm": paradigm, "base_fingerprint": fingerprint_state(net.state_dict())}
    return TaskVector(tensors, meta)


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_bit_equal(net: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name


def test_edited_restores_theta0_bit_exactly() -> None:
    net = _net()
    before = _snapshot(net)
    tau1, tau2 = _vector(net, 1), _vector(net, 2)
    resident = ResidentModel(net)
    for alphas in ((0.3,), (0.1, -0.7), (1 / 3, 2 / 7)):
        edits = list(zip((tau1, tau2), alphas))
        with resident.edited(*edits):
            moved = net[0].weight.detach().clone()
        expected = before["0.weight"] + sum(a * t["0.weight"] for t, a in edits)
        assert torch.allclose(moved, expected, atol=1e-6)
        assert not torch.equal(moved, before["0.weight"])
        _assert_bit_equal(net, before)  # θ0 + α·τ − α·τ would not be bit-exact


def test_edited_restores_after_an_exception() -> None:
    net = _net()
    before = _snapshot(net)
    resident = ResidentModel(net)
    with pytest.raises(RuntimeError, match="boom"), resident.edited((_vector(net, 1), 0.5)):
        raise RuntimeError("boom")
    _assert_bit_equal(net, before)
    with resident.edited((_vector(net, 1), 0.5)):  # and it is usable again
        pass


def test_edits_do_not_nest() -> None:
    net = _net()
    resident = ResidentModel(net)
    tau = _vector(net, 1)
    with resident.edited((tau, 0.5)), pytest.raises(RuntimeError, match="nest"), \
            resident.edited((tau, 0.5)):
        pass


def test_in_place_equals_deep_copy_with_vector_applied() -> None:
    net = _net()
    tau = _vector(net, 3)
    x = torch.randn(16, 3, 8, 8)
    resident = ResidentModel(net)
    for alpha in (0.0, 0.35, 1.0, -0.5):
        reference = tau.apply_to(copy.deepcopy(net), alpha)
        with torch.no_grad(), resident.edited((tau, alpha)) as edited:
            assert torch.equal(edited(x), reference(x))


def test_grid_accuracy_matches_per_alpha_deep_copies() -> None:
    net = _net()
    tau = _vector(net, 4, scale=0.5)
    data = TensorDataset(torch.randn(40, 3, 8, 8), torch.randint(0, 6, (40,)))
    head = nn.Identity()
    alphas = [0.0, 0.25, 0.5, 1.0]
    before = _snapshot(net)
    got = grid_accuracy(net, head, data, tau, alphas, batch_size=16)
    expected = [accuracy(tau.apply_to(copy.deepcopy(net), a), head, data) for a in alphas]
    assert got == expected
    assert len(set(got)) > 1  # the vector actually changes the predictions
    _assert_bit_equal(net, before)


def test_two_vector_grid_matches_combined_edit() -> None:
    """The ξ(α1, α2) grid of the disentanglement error: θ0 + α1·τ1 + α2·τ2."""
    net = _net()
    tau1, tau2 = _vector(net, 5), _vector(net, 6)
    data = TensorDataset(torch.randn(24, 3, 8, 8), torch.randint(0, 6, (24,)))
    points = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.7, -0.3)]
    got = grid_predictions(net, nn.Identity(), data, [tau1, tau2], points)
    for row, (a1, a2) in zip(got, points):
        reference = tau2.apply_to(tau1.apply_to(copy.deepcopy(net), a1), a2)
        with torch.no_grad():
            assert torch.equal(row, reference(data.tensors[0]).argmax(-1))


def test_vector_is_validated_before_any_weight_moves() -> None:
    net = _net()
    before = _snapshot(net)
    resident = ResidentModel(net)
    good = _vector(net, 1)
    bad_shape = TaskVector({"0.weight": torch.ones(8, 3, 1, 1)}, good.metadata)
    with pytest.raises(TaskVectorMismatch, match=r"0\.weight"), \
            resident.edited((good, 1.0), (bad_shape, 1.0)):
        pass
    unknown = TaskVector({"missing.weight": torch.ones(2)}, {"paradigm": "full"})
    with pytest.raises(TaskVectorMismatch, match=r"missing\.weight"), resident.edited((unknown, 1.0)):
        pass
    other_base = TaskVector(dict(good), {**good.metadata, "base_fingerprint": "0123456789abcdef"})
    with pytest.raises(TaskVectorMismatch, match="base model"), resident.edited((other_base, 1.0)):
        pass
    with pytest.raises(ValueError, match="finite"), resident.edited((good, float("nan"))):
        pass
    _assert_bit_equal(net, before)
