"""What makes OrthoReg cheap must not change what it computes (docs/PERFORMANCE.md).

The fused batched penalty equals the per-matrix definition (values and gradients), the
Hutchinson estimator is unbiased for the squared form, evaluating R once per optimizer
step under accumulation is the same objective as per micro-batch, and a training step
never makes a new copy of θ0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orthoreg.paradigms import Full, Lora, Partial
from orthoreg.regularizer import (
    OrthoReg,
    _gram_minus_identity,
    _symmetric_gram_minus_identity,
    fused_hutchinson,
    fused_penalty,
    gram_flop_factor,
    hutchinson_penalty,
    orthoreg_penalty,
    rademacher,
)
from orthoreg.training import TrainConfig, Trainer

SHAPES = {"tall": (9, 4), "wide": (4, 9), "square": (6, 6), "conv": (5, 3, 3, 3)}


def weights_and_references(shape: tuple[int, ...], count: int = 3, seed: int = 0,
                           dtype: torch.dtype = torch.float64) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    references = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(count)]
    weights = [
        (ref + 0.4 * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_()
        for ref in references
    ]
    return weights, references


def loop_grads(weights: list[Tensor], penalties: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(torch.stack(penalties).sum(), weights))


# --------------------------------------------------------------------------- batched = loop
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fused_batched_penalty_equals_per_matrix_loop(shape, squared):
    """One bmm per group with the hand-written backward = orthoreg_penalty matrix by matrix."""
    weights, references = weights_and_references(shape)
    batched = fused_penalty(weights, references, squared=squared)
    looped = [orthoreg_penalty(w - r, squared=squared) for w, r in zip(weights, references)]
    torch.testing.assert_close(batched, torch.stack(looped), rtol=1e-12, atol=1e-12)
    grads_batched = torch.autograd.grad(batched.sum(), weights)
    for got, expected in zip(grads_batched, loop_grads(weights, looped)):
        assert got.shape == shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # θ0 as views of one stacked buffer takes the whole-stack path: same numbers
    stacked_refs = list(torch.stack(references).unbind(0))
    again = fused_penalty(weights, stacked_refs, squared=squared)
    torch.testing.assert_close(again, batched, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(again.sum(), weights), grads_batched):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_fused_penalty_passes_gradcheck_and_weights_the_upstream_gradient(squared):
    weights, references = weights_and_references((7, 3), count=2, seed=1)
    torch.autograd.gradcheck(lambda *w: fused_penalty(list(w), references, squared), weights)
    scale = torch.tensor([2.0, -0.5], dtype=torch.float64)
    (fused_penalty(weights, references, squared) * scale).sum().backward()
    for w, r, s in zip(weights, references, scale):
        (expected,) = torch.autograd.grad(s * orthoreg_penalty(w - r, squared), w)
        torch.testing.assert_close(w.grad, expected)


def test_fused_penalty_gradient_is_exactly_zero_at_zero_update():
    """Unsquared form at ΔW = 0: finite zero gradient, not NaN (G − I = −I, R = √n > 0)
    and also where G = I exactly (R = 0), matching matrix_norm's backward convention."""
    zero = [torch.zeros(6, 3, requires_grad=True)]
    fused_penalty(zero, squared=False).sum().backward()
    assert torch.equal(zero[0].grad, torch.zeros(6, 3))
    orthonormal = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0].requires_grad_()
    value = fused_penalty([orthonormal], squared=False)
    value.sum().backward()
    assert float(value.detach()) < 1e-7 and torch.isfinite(orthonormal.grad).all()


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", [(9, 4), (4, 9)], ids=["tall", "wide"])
def test_batched_hutchinson_equals_per_matrix_loop_with_the_same_probes(shape, squared):
    weights, references = weights_and_references(shape, count=4, seed=2)
    z = rademacher((4, min(shape), 5), torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = fused_hutchinson(weights, z, references, squared=squared)
    looped = [hutchinson_penalty(w - r, 5, squared, z=probe)
              for w, r, probe in zip(weights, references, z)]
    torch.testing.assert_close(batched, torch.stack(looped), rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(batched.sum(), weights),
                             loop_grads(weights, looped)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_orthoreg_matches_the_definition_on_a_model_with_several_groups(conv_net):
    """Grouping, borrowing θ0 and the workspace shared by groups change nothing."""
    base, model = conv_net(0), conv_net(1)
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    for squared in (False, True):
        reg = OrthoReg(model, reference=reference, squared=squared)
        model.zero_grad()
        reg().backward()
        params = dict(model.named_parameters())
        for name in reg.names:
            expected = orthoreg_penalty(params[name] - reference[name], squared)
            (grad,) = torch.autograd.grad(expected, params[name])
            torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 700, 300), (2, 300, 700), (1, 600, 600), (3, 200, 90)],
                         ids=["tall-2-blocks", "wide-2-blocks", "square-4-blocks", "unblocked"])
def test_symmetric_gram_from_upper_blocks_equals_the_full_gram(shape):
    """Computing G − I from its blocks on and above the diagonal changes nothing."""
    deltas = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_symmetric_gram_minus_identity(deltas),
                               _gram_minus_identity(deltas), rtol=1e-12, atol=1e-12)
    assert gram_flop_factor(min(shape[1:])) == {90: 1.0, 300: 0.75, 600: 0.625}[min(shape[1:])]


@pytest.mark.parametrize("squared", [False, True])
def test_fused_penalty_with_a_blocked_gram_matches_the_definition(squared):
    weights, references = weights_and_references((520, 300), count=2, seed=5)
    batched = fused_penalty(weights, references, squared=squared)
    looped = [orthoreg_penalty(w - r, squared=squared) for w, r in zip(weights, references)]
    torch.testing.assert_close(batched, torch.stack(looped), rtol=1e-11, atol=1e-9)
    for got, expected in zip(torch.autograd.grad(batched.sum(), weights),
                             loop_grads(weights, looped)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


class WideAndTall(nn.Module):
    """Equal-shape groups, tall and wide matrices, a conv kernel and a blocked (300-wide) Gram."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.up = nn.ModuleList(nn.Linear(6, 300, bias=False) for _ in range(2))  # tall 300×6
        self.down = nn.Linear(300, 5)  # wide 5×300
        self.square = nn.Linear(300, 300, bias=False)  # 300², Gram in 2 blocks


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("squared", [False, True])
def test_accumulate_grad_equals_backward_through_the_penalty(estimator, squared):
    """reg.accumulate_grad(λ) adds to .grad what (λ·reg()).backward() would, same value,
    same probes; existing gradients are kept, missing ones created."""
    torch.manual_seed(0)
    results = []
    for fused in (False, True):
        model = WideAndTall().double()
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=p.dtype))
        reg = OrthoReg(model, reference=reference, squared=squared, estimator=estimator,
                       probes=3, generator=torch.Generator().manual_seed(9))
        model.up[0].weight.grad = torch.full_like(model.up[0].weight, 0.25)  # kept, added to
        if fused:
            value = reg.accumulate_grad(0.7)
            assert not value.requires_grad
        else:
            value = reg()
            (0.7 * value).backward()
        results.append((value.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (value_a, grads_a), (value_b, grads_b) = results
    torch.testing.assert_close(value_b, value_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        if grads_a[name] is None:
            assert grads_b[name] is None, name
        else:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-12)


def test_accumulate_grad_covers_lora_adapters_in_lowrank_form(conv_net):
    model = Lora(targets=["pointwise", "fc"], rank=2, alpha=4.0).prepare(conv_net())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    reg = model.regularizer()
    (2.0 * reg()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    value = reg.accumulate_grad(2.0)
    assert float(value) == pytest.approx(float(reg().detach()))
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name])


# --------------------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("shape", [(12, 6), (6, 12)], ids=["tall", "wide"])
def test_orthoreg_hutchinson_is_unbiased_in_value_and_gradient(shape):
    """Mean over many probe draws → exact ‖G − I‖²_F and its gradient (squared form)."""
    torch.manual_seed(0)
    model = nn.Linear(shape[1], shape[0], bias=False).double()
    reference = {"weight": model.weight.detach() + 0.3 * torch.randn(shape, dtype=torch.float64)}
    exact_reg = OrthoReg(model, reference=reference, squared=True)
    exact = exact_reg()
    (exact_grad,) = torch.autograd.grad(exact, model.weight)
    reg = OrthoReg(model, reference=reference, squared=True, estimator="hutchinson", probes=2,
                   generator=torch.Generator().manual_seed(1))
    draws = 3000
    values, grads = [], []
    for _ in range(draws):
        value = reg()
        values.append(value.detach())
        grads.append(torch.autograd.grad(value, model.weight)[0])
    values_t, grads_t = torch.stack(values), torch.stack(grads)
    stderr = float(values_t.std()) / math.sqrt(draws)
    assert abs(float(values_t.mean()) - float(exact.detach())) < 4 * stderr
    assert stderr < 0.02 * float(exact.detach())  # sharp enough to see a biased estimator
    grad_stderr = grads_t.std(dim=0) / math.sqrt(draws)
    assert ((grads_t.mean(dim=0) - exact_grad).abs() <= 5 * grad_stderr + 1e-12).all()


def test_hutchinson_square_root_form_is_biased_low_within_the_documented_bound():
    """E√estimate ≤ R (Jensen), and by less than 1/(4k) relative (the docstring's bound)."""
    torch.manual_seed(0)
    model = nn.Linear(10, 20, bias=False).double()
    reference = {"weight": model.weight.detach() + 0.3 * torch.randn(20, 10, dtype=torch.float64)}
    exact = float(OrthoReg(model, reference=reference)().detach())
    probes = 4
    reg = OrthoReg(model, reference=reference, estimator="hutchinson", probes=probes,
                   generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean = float(torch.stack([reg() for _ in range(4000)]).mean())
    assert mean < exact
    assert (exact - mean) / exact < 1 / (4 * probes)


# --------------------------------------------------------------------------- accumulation
def test_once_per_step_penalty_equals_per_micro_batch_penalty(conv_net, head, images):
    """Σ_k (L_k/K + λR/K) and (Σ_k L_k/K) + λR have the same gradient; R is evaluated once."""
    lam, micro = 0.7, 4
    x, y = images.tensors
    chunks = list(zip(x.split(8), y.split(8)))[:micro]
    grads = []
    for once in (False, True):
        model = Full().prepare(conv_net(0))
        with torch.no_grad():  # move off θ0 so that ∇R is not zero
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        reg = model.regularizer()
        model.zero_grad()
        for xb, yb in chunks:
            loss = F.cross_entropy(head(model(xb)), yb) / micro
            if not once:
                loss = loss + lam * reg() / micro
            loss.backward()
        if once:
            (lam * reg()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


class Twins(nn.Module):
    """Two equal-shape linear layers (one OrthoReg group of 2) between a conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.fc(F.gelu(self.b(F.gelu(self.a(h)))))


class CountingPenalty:
    """Wraps an OrthoReg, counting evaluations and recording θ0 and workspace addresses."""

    def __init__(self, reg: OrthoReg) -> None:
        self.reg, self.calls, self.addresses = reg, 0, []

    def accumulate_grad(self, scale: float) -> Tensor:
        self.calls += 1
        value = self.reg.accumulate_grad(scale)
        self.addresses.append(addresses(self.reg))
        return value

    def per_layer(self) -> dict[str, Tensor]:
        return self.reg.per_layer()


def addresses(reg: OrthoReg) -> tuple[list[int], list[int]]:
    refs = [ref.data_ptr() for group in reg._groups for ref in group.references]
    work = [buf.data_ptr() for buf in reg._workspace._buffers.values()]
    return refs, work


@pytest.mark.parametrize("paradigm", [Full(), Partial(["a.weight", "b.weight"])],
                         ids=["full", "partial"])
def test_training_evaluates_penalty_once_per_step_and_never_copies_theta0(
        head, images, paradigm):
    torch.manual_seed(0)
    model = paradigm.prepare(Twins())
    cfg = TrainConfig(steps=3, batch_size=4, accumulation=3, lr=1e-2, warmup_steps=0,
                      lam=0.5, progress=False, log_every=1, checkpoint_every=100)
    trainer = Trainer(model, head, TensorDataset(*images.tensors), cfg)
    counting = CountingPenalty(trainer.reg)
    trainer.reg = counting  # type: ignore[assignment]
    trainer.run()
    assert counting.calls == cfg.steps  # not steps × accumulation
    # the paradigm's θ0 buffers are the only copy: OrthoReg owns none and borrows views
    # of the paradigm's stacked buffer ...
    reg = counting.reg
    buffers = {name: buf for name, buf in model.named_buffers() if name.startswith("theta0")}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(b.numel() for b in buffers.values()) == sum(p.numel() for p in trained)
    assert all(group.reference is None for group in reg._groups)
    pair = next(group for group in reg._groups if group.names == ["a.weight", "b.weight"])
    assert any(all(ref.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                   for ref in pair.references) for buf in buffers.values())
    # ... and neither θ0 nor the ΔW workspace is reallocated from step to step
    assert all(entry == counting.addresses[0] for entry in counting.addresses)


def test_reference_aliasing_live_weights_is_copied_once(conv_net):
    """``model.state_dict()`` shares memory with the weights: it must not be borrowed."""
    model = conv_net()
    reg = OrthoReg(model, reference=model.state_dict())
    assert all(group.reference is not None for group in reg._groups)
    with torch.no_grad():
        model.fc.weight.add_(0.5)
        assert float(reg.per_layer()["fc.weight"]) != pytest.approx(math.sqrt(6))


def test_penalty_under_cpu_autocast_is_computed_in_float32(conv_net):
    model = conv_net()
    reg = OrthoReg(model, squared=True)
    with torch.no_grad():
        model.fc.weight.add_(0.01)
    expected = float(reg().detach())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        value = reg()
    assert value.dtype == torch.float32 and float(value) == pytest.approx(expected, rel=1e-6)
