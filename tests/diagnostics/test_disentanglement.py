"""ξ(α1, α2): exact zero for a disentangled model, > 0 for interfering vectors, equal to a
naive per-point computation, and computed on one resident model without copies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from orthoreg.diagnostics import (
    DisentanglementMap,
    TaskProbe,
    alpha_grid,
    disentanglement_error,
)
from orthoreg.evaluation.accuracy import predict
from orthoreg.paradigms.linear import LinearizedModel
from orthoreg.taskvector import TaskVector

# block k of the 4 coordinates belongs to task k: task 1 lives in 0..1, task 2 in 2..3
BLOCKS = (slice(0, 2), slice(2, 4))


class BlockNet(nn.Module):
    """tanh MLP whose weights are block-diagonal: block k only sees block k's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        with torch.no_grad():
            for layer in (self.mix, self.out):
                layer.weight.mul_(block_mask())

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(x)))


def block_mask(block: int | None = None) -> Tensor:
    """1 on the diagonal blocks (or on one block only)."""
    mask = torch.zeros(4, 4)
    for index, rows in enumerate(BLOCKS):
        if block is None or block == index:
            mask[rows, rows] = 1.0
    return mask


def block_head(block: int, seed: int) -> nn.Linear:
    """A 3-class head that reads only its task's block of features."""
    torch.manual_seed(seed)
    head = nn.Linear(4, 3)
    with torch.no_grad():
        keep = torch.zeros(4)
        keep[BLOCKS[block]] = 1.0
        head.weight.mul_(keep)
    return head


def block_data(block: int, n: int = 40, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 4)
    x[:, BLOCKS[block]] = 2 * torch.randn(n, 2, generator=generator)
    return x, torch.randint(0, 3, (n,), generator=generator)


def block_vector(model: nn.Module, block: int | None, seed: int, paradigm: str,
                 scale: float = 1.5) -> TaskVector:
    """Random τ on one block of every weight and bias (block None: dense, interfering)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.named_parameters():
        noise = scale * torch.randn(param.shape, generator=generator)
        if block is not None:
            if param.ndim == 2:
                noise = noise * block_mask(block)
            else:
                keep = torch.zeros(4)
                keep[BLOCKS[block]] = 1.0
                noise = noise * keep
        tensors[name] = noise
    return TaskVector(tensors, {"paradigm": paradigm})


@pytest.fixture
def setup() -> tuple[nn.Module, list[TaskProbe]]:
    torch.manual_seed(0)
    model = BlockNet().eval()
    probes = [TaskProbe("one", block_head(0, 1), block_data(0, seed=2)),
              TaskProbe("two", block_head(1, 3), block_data(1, seed=4))]
    return model, probes


def naive_xi(model: nn.Module, probes: list[TaskProbe], vectors: list[TaskVector],
             alphas: list[float], paradigm: str) -> Tensor:
    """ξ from scratch: a fresh model per point (deepcopy + apply, or set_delta), no caching."""

    def predictions(probe: TaskProbe, a1: float, a2: float) -> Tensor:
        if paradigm == "linear":
            lin = LinearizedModel(copy.deepcopy(model), list(vectors[0]))
            combined = {k: a1 * vectors[0][k] + a2 * vectors[1][k] for k in vectors[0]}
            lin.set_delta(combined)
            return predict(lin, probe.head, probe.data)
        edited = copy.deepcopy(model)
        vectors[0].apply_to(edited, a1)
        vectors[1].apply_to(edited, a2)
        return predict(edited, probe.head, probe.data)

    xi = torch.zeros(len(alphas), len(alphas), dtype=torch.float64)
    for i, a1 in enumerate(alphas):
        for j, a2 in enumerate(alphas):
            joint = [predictions(p, a1, a2) for p in probes]
            single = [predictions(probes[0], a1, 0.0), predictions(probes[1], 0.0, a2)]
            xi[i, j] = sum(float((s != m).double().mean()) for s, m in zip(single, joint))
    return xi


def test_alpha_grid_default_is_13_points_over_pm3_with_zero() -> None:
    grid = alpha_grid()
    assert len(grid) == 13 and grid[0] == -3.0 and grid[-1] == 3.0 and 0.0 in grid
    with pytest.raises(ValueError):
        alpha_grid(1)
    with pytest.raises(ValueError):
        alpha_grid(5, -1.0)


@pytest.mark.parametrize("paradigm", ["full", "linear"])
def test_xi_is_zero_for_vectors_on_disjoint_blocks(setup, paradigm: str) -> None:
    model, probes = setup
    vectors = [block_vector(model, 0, 10, paradigm), block_vector(model, 1, 11, paradigm)]
    result = disentanglement_error(model, probes, vectors, alpha_grid(7, 3.0))
    assert result.xi.shape == (7, 7)
    assert float(result.xi.abs().max()) == 0.0
    assert result.disk_mean() == 0.0
    # the vectors are not trivial: scaling τ1 alone changes task 1's predictions
    base = predict(model, probes[0].head, probes[0].data)
    moved = copy.deepcopy(model)
    vectors[0].apply_to(moved, 3.0)
    if paradigm == "full":
        assert (predict(moved, probes[0].head, probes[0].data) != base).any()


@pytest.mark.parametrize("paradigm", ["full", "linear"])
def test_xi_is_positive_for_interfering_vectors(setup, paradigm: str) -> None:
    model, probes = setup
    vectors = [block_vector(model, None, 10, paradigm), block_vector(model, None, 11, paradigm)]
    result = disentanglement_error(model, probes, vectors, alpha_grid(7, 3.0))
    assert float(result.xi.max()) > 0.25
    assert result.xi[3, 3] == 0.0  # (0, 0) is θ0 on both sides
    assert torch.all((result.xi >= 0) & (result.xi <= 2))


@pytest.mark.parametrize("paradigm", ["full", "linear"])
@pytest.mark.parametrize("alphas", [[-2.0, -1.0, 0.0, 1.0, 2.0], [-1.5, 0.5, 2.5]])
def test_xi_matches_a_naive_per_point_computation(setup, paradigm: str,
                                                  alphas: list[float]) -> None:
    """Also covers grids without 0, whose single-task points are evaluated separately."""
    model, probes = setup
    vectors = [block_vector(model, None, 20, paradigm, 0.7),
               block_vector(model, None, 21, paradigm, 0.7)]
    result = disentanglement_error(model, probes, vectors, alphas)
    expected = naive_xi(model, probes, vectors, alphas, paradigm)
    # a tangent-space grid sums J·τ terms in another order: allow a flip of one example
    tolerance = 0.0 if paradigm == "full" else 2 / 40 + 1e-12
    assert torch.allclose(result.xi, expected, atol=tolerance, rtol=0)
    assert 0 < float(expected.max())


def test_one_resident_model_no_copies_and_theta0_restored(setup, monkeypatch) -> None:
    model, probes = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = [block_vector(model, None, 30, "full"), block_vector(model, None, 31, "full")]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def no_copy(*_args, **_kw):
        raise AssertionError("ξ must not copy the model")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    result = disentanglement_error(model, probes, vectors, alpha_grid(5, 2.0), batch_size=16)
    batches = math.ceil(40 / 16)
    # one pass per grid point, batch and task: the single-task points are grid points
    assert len(calls) == 5 * 5 * batches * 2 == result.forward_passes
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_linear_grid_uses_one_jvp_per_vector_and_batch(setup, monkeypatch) -> None:
    model, probes = setup
    vectors = [block_vector(model, None, 40, "linear"), block_vector(model, None, 41, "linear")]
    calls = []
    original = LinearizedModel.value_and_jvp

    def counted(self, x, tangent):
        calls.append(len(x))
        return original(self, x, tangent)

    monkeypatch.setattr(LinearizedModel, "value_and_jvp", counted)
    result = disentanglement_error(model, probes, vectors, alpha_grid(13, 3.0), batch_size=16)
    batches = math.ceil(40 / 16)
    assert len(calls) == 2 * 2 * batches == result.forward_passes  # not 169 × anything


def test_max_examples_subsamples_and_result_serialises(setup) -> None:
    model, probes = setup
    vectors = [block_vector(model, None, 50, "full"), block_vector(model, None, 51, "full")]
    result = disentanglement_error(model, probes, vectors, [-1.0, 0.0, 1.0], max_examples=8)
    assert isinstance(result, DisentanglementMap)
    assert result.examples == (8, 8)
    record = result.to_dict()
    assert record["alphas"] == [-1.0, 0.0, 1.0] and len(record["xi"]) == 3
    inside = [result.xi[i, j] for i, a in enumerate(result.alphas)
              for j, b in enumerate(result.alphas) if a * a + b * b <= 1]
    assert math.isclose(record["disk_mean"], float(sum(inside) / len(inside)))
    assert record["seconds"] > 0


def test_bad_inputs_fail_before_any_work(setup) -> None:
    model, probes = setup
    full = block_vector(model, 0, 1, "full")
    linear = block_vector(model, 1, 2, "linear")
    with pytest.raises(ValueError, match="two tasks"):
        disentanglement_error(model, probes[:1], [full, full])
    with pytest.raises(ValueError, match="paradigm"):
        disentanglement_error(model, probes, [full, linear])
    with pytest.raises(ValueError, match="finite"):
        disentanglement_error(model, probes, [full, full], [0.0, float("nan")])
