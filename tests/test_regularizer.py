"""OrthoReg penalty R(ΔW) = ‖G − I‖_F against an explicit float64 reference (DESIGN §1)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import Tensor, nn

from orthoreg.paradigms import Full, Linear, Lora
from orthoreg.regularizer import (
    OrthoReg,
    batched_penalty,
    hutchinson_penalty,
    lowrank_penalty,
    orthoreg_penalty,
)

SHAPES = {
    "tall": (9, 4),
    "wide": (4, 9),
    "square": (6, 6),
    "conv_wide": (5, 3, 3, 3),  # (out, in·kh·kw) = (5, 27)
    "conv_tall": (20, 2, 2, 2),  # (20, 8)
}


def dense_reference(delta: Tensor, squared: bool) -> Tensor:
    """The definition, spelled out: smaller Gram, explicit identity, Frobenius norm."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    rows, cols = matrix.shape
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    identity = torch.eye(gram.shape[0], dtype=torch.float64)
    value = torch.linalg.norm(gram - identity)
    return value**2 if squared else value


def reference_gradient(delta: Tensor, squared: bool) -> Tensor:
    """Closed form: ∇‖G−I‖² = 4Δ(G−I) (tall) or 4(G−I)Δ (wide); ∇‖G−I‖ = that / 2‖G−I‖."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    rows, cols = matrix.shape
    if rows >= cols:
        residual = matrix.T @ matrix - torch.eye(cols, dtype=torch.float64)
        grad = 4 * matrix @ residual
    else:
        residual = matrix @ matrix.T - torch.eye(rows, dtype=torch.float64)
        grad = 4 * residual @ matrix
    if not squared:
        grad = grad / (2 * torch.linalg.norm(residual))
    return grad.reshape(delta.shape)


def random_delta(shape: tuple[int, ...], seed: int, std: float = 0.4) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_penalty_value_and_gradient_match_dense_reference(shape, squared):
    """R and ∇R agree with the definition for tall, wide, square and conv-shaped updates."""
    delta = random_delta(shape, seed=len(shape) * 100 + shape[0]).requires_grad_()
    value = orthoreg_penalty(delta, squared=squared)
    value.backward()
    expected = dense_reference(delta.detach(), squared)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta.grad, reference_gradient(delta.detach(), squared),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_penalty_float32_close_to_float64_reference(squared):
    """The float32 path (what training uses) stays within float32 tolerance of float64."""
    delta = random_delta((16, 8, 3, 3), seed=3, std=0.1)
    value = orthoreg_penalty(delta.float(), squared=squared)
    torch.testing.assert_close(value.double(), dense_reference(delta, squared), rtol=1e-5, atol=0)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6)])
def test_batched_penalty_equals_loop(shape, squared):
    """The batched Gram of a (B, m, n) stack equals R of each matrix, values and gradients."""
    stack = random_delta((5, *shape), seed=11).requires_grad_()
    batched = batched_penalty(stack, squared=squared)
    assert batched.shape == (5,)
    looped = torch.stack([orthoreg_penalty(d, squared=squared) for d in stack.unbind(0)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    (grad_batched,) = torch.autograd.grad(batched.sum(), stack)
    (grad_looped,) = torch.autograd.grad(looped.sum(), stack)
    torch.testing.assert_close(grad_batched, grad_looped, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- ΔW = 0 and small ΔW
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradient_is_exactly_zero_at_zero_update(shape, squared):
    """G is quadratic in ΔW, so ∇R(0) = 0 exactly: the term never kicks the start of FT."""
    delta = torch.zeros(shape, requires_grad=True)
    value = orthoreg_penalty(delta, squared=squared)
    value.backward()
    n = min(shape[0], math.prod(shape[1:]))
    assert float(value.detach()) == pytest.approx(n if squared else math.sqrt(n))
    assert torch.equal(delta.grad, torch.zeros(shape))
    stack = torch.zeros((3, *shape[:1], math.prod(shape[1:])), requires_grad=True)
    batched_penalty(stack, squared=squared).sum().backward()
    assert torch.equal(stack.grad, torch.zeros_like(stack))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("paradigm", [Full(), Linear(), Lora(targets=["fc", "pointwise"], rank=2)],
                         ids=["full", "linear", "lora"])
def test_orthoreg_on_fresh_model_has_zero_finite_gradient(conv_net, paradigm, squared):
    """At θ = θ0 OrthoReg's gradient is exactly zero and finite in every paradigm (no NaN)."""
    model = paradigm.prepare(conv_net())
    value = model.regularizer(squared=squared)()
    assert torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    for grad in grads:
        if grad is not None:
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 2, 2, 2)])
def test_gradient_step_pushes_small_singular_values_towards_one(shape, squared):
    """For small ΔW, ΔW − η∇R keeps singular vectors and raises every σ < 1 towards 1."""
    delta = random_delta(shape, seed=5, std=0.05).requires_grad_()
    orthoreg_penalty(delta, squared=squared).backward()
    with torch.no_grad():
        stepped = delta - 1e-2 * delta.grad
    before = torch.linalg.svdvals(delta.detach().reshape(shape[0], -1))
    after = torch.linalg.svdvals(stepped.reshape(shape[0], -1))
    assert bool((before < 1).all())
    assert bool((after > before).all()), (before, after)
    assert bool((after < 1).all())


# --------------------------------------------------------------------------- low-rank form
def _lora_cases() -> list[tuple[tuple[int, ...], tuple[int, ...], float]]:
    """(A shape, B shape, scale) for random ranks 1..16: linear tall/wide and conv LoRA."""
    rng = random.Random(2026)
    cases = []
    for rank in (1, 2, 3, 5, 8, 11, 16):
        out_features, in_features = rng.choice([(20, 12), (12, 20), (16, 16)])
        scale = rng.choice([0.5, 1.0, 2.0])
        cases.append(((rank, in_features), (out_features, rank), scale))
        out_ch, in_ch, k = rng.choice([(10, 3, 3), (40, 4, 1), (6, 2, 3)])
        cases.append(((rank, in_ch, k, k), (out_ch, rank, 1, 1), scale))
    return cases


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("a_shape,b_shape,scale", _lora_cases())
def test_lowrank_penalty_equals_dense_penalty_of_merged_update(a_shape, b_shape, scale, squared):
    """R(s·B·A) from r×r matrices equals the dense R of the merged update, values and grads."""
    generator = torch.Generator().manual_seed(sum(a_shape) * 31 + sum(b_shape))
    A = (torch.randn(a_shape, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    B = (torch.randn(b_shape, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    value = lowrank_penalty(A, B, scale, squared=squared)
    grad_a, grad_b = torch.autograd.grad(value, (A, B))

    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    merged = scale * B_ref.reshape(b_shape[0], -1) @ A_ref.reshape(a_shape[0], -1)
    expected = dense_reference(merged, squared)
    ref_a, ref_b = torch.autograd.grad(expected, (A_ref, B_ref))
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_a, ref_a, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(grad_b, ref_b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_lowrank_penalty_lower_bound_sqrt_n_minus_r(rank):
    """rank ΔW ≤ r < n leaves n − r zero eigenvalues of G, so R ≥ √(n−r); tight at σ_i = 1."""
    n = 10
    generator = torch.Generator().manual_seed(rank)
    for _ in range(5):
        A = torch.randn(rank, n, generator=generator, dtype=torch.float64)
        B = torch.randn(2 * n, rank, generator=generator, dtype=torch.float64)
        assert float(lowrank_penalty(A, B, 1.0)) >= math.sqrt(n - rank) - 1e-12
    # orthonormal factors: every nonzero singular value is 1 and the bound is attained
    q_a, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
    q_b, _ = torch.linalg.qr(torch.randn(2 * n, rank, generator=generator, dtype=torch.float64))
    assert float(lowrank_penalty(q_a.T, q_b, 1.0)) == pytest.approx(math.sqrt(n - rank), abs=1e-9)


def test_lowrank_penalty_rejects_factors_that_do_not_compose():
    with pytest.raises(ValueError, match="do not compose"):
        lowrank_penalty(torch.zeros(3, 5), torch.zeros(4, 2), 1.0)


# --------------------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("shape", [(12, 6), (6, 12)])
def test_hutchinson_squared_is_unbiased(shape):
    """E_z‖(G−I)z‖² = ‖G−I‖²_F: the mean over many seeds lands within 4 standard errors."""
    delta = random_delta(shape, seed=1, std=0.3)
    exact = float(dense_reference(delta, squared=True))
    estimates = torch.stack([
        hutchinson_penalty(delta, probes=2, squared=True,
                           generator=torch.Generator().manual_seed(seed))
        for seed in range(1500)
    ])
    mean, stderr = float(estimates.mean()), float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    assert stderr < 0.02 * exact  # the check above is sharp enough to catch a biased estimator
    again = hutchinson_penalty(delta, 2, True, torch.Generator().manual_seed(0))
    assert float(again) == float(estimates[0])  # a seeded generator makes it reproducible


# --------------------------------------------------------------------------- OrthoReg
class Selection(nn.Module):
    """A 2-D parameter under a norm-like name, besides ordinary layers and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        self.prenorm_proj = nn.Parameter(torch.randn(3, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_default_selection_is_trainable_matrices_without_norms_or_biases(conv_net):
    """Default: ≥2-D trainable weights; biases, BN/LayerNorm and frozen tensors excluded."""
    assert OrthoReg(conv_net()).names == ["conv.weight", "pointwise.weight", "fc.weight"]
    assert OrthoReg(Selection()).names == ["encoder.0.weight", "encoder.2.weight"]


def test_include_and_exclude_globs(conv_net):
    """``include`` replaces the default rule (even norm-named 2-D tensors); ``exclude`` prunes."""
    model = Selection()
    assert OrthoReg(model, include=["*prenorm*"]).names == ["prenorm_proj"]
    assert OrthoReg(model, include=["encoder.*"], exclude=["*.2.*"]).names == ["encoder.0.weight"]
    assert OrthoReg(conv_net(), exclude=["*conv.*", "point*"]).names == ["fc.weight"]


def test_empty_selection_is_an_error(conv_net):
    with pytest.raises(ValueError, match="selected no parameters"):
        OrthoReg(conv_net(), include=["does.not.exist"])


def test_reference_missing_key_or_wrong_shape_names_the_parameter(conv_net):
    model = conv_net()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    del reference["pointwise.weight"]
    with pytest.raises(KeyError, match=r"pointwise\.weight"):
        OrthoReg(model, reference=reference)
    reference["pointwise.weight"] = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=r"pointwise\.weight.*\(8, 8\)"):
        OrthoReg(model, reference=reference)


def test_reference_captured_once_on_parameter_device_and_not_aliasing_weights(conv_net):
    """θ0 is stacked once on the weights' device; calls reuse it and training cannot move it."""
    model = conv_net()
    reg = OrthoReg(model)
    references = [group.reference for group in reg._groups]
    pointers = [ref.data_ptr() for ref in references]
    assert all(ref.device == model.fc.weight.device for ref in references)
    at_start = math.sqrt(8) + math.sqrt(8) + math.sqrt(6)  # ΔW = 0: R = √n per matrix
    assert float(reg().detach()) == pytest.approx(at_start)
    with torch.no_grad():
        model.fc.weight.add_(0.1)
    reg().backward()
    assert [g.reference.data_ptr() for g in reg._groups] == pointers
    assert all(g.reference is ref for g, ref in zip(reg._groups, references))
    with torch.no_grad():
        expected = orthoreg_penalty(model.fc.weight - conv_net().fc.weight)
        assert float(reg.per_layer()["fc.weight"]) == pytest.approx(float(expected), rel=1e-6)
        assert float(reg()) != pytest.approx(at_start)  # the live weights are not θ0


def test_explicit_reference_and_model_argument(conv_net):
    """A given θ0 defines ΔW; ``reg(other)`` evaluates the same names on another module."""
    base, other = conv_net(0), conv_net(1)
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    reg = OrthoReg(other, reference=reference, squared=True)
    expected = sum(
        float(dense_reference(dict(other.named_parameters())[n].detach() - reference[n], True))
        for n in reg.names
    )
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)
    assert float(reg(base).detach()) == pytest.approx(sum(min(*p.reshape(p.shape[0], -1).shape)
                                                 for n, p in base.named_parameters()
                                                 if n in reg.names))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("model_name,targets", [("conv", ["conv", "pointwise", "fc"]),
                                                ("attn", "vit_attention")])
def test_lora_adapters_use_lowrank_form_equal_to_dense_merged_penalty(
        conv_net, attn_net, model_name, targets, squared):
    """PEFT adapters are penalised in low-rank form, equal to R of the merged dense update."""
    backbone = conv_net() if model_name == "conv" else attn_net()
    model = Lora(targets=targets, rank=2, alpha=4.0).prepare(backbone)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    reg = model.regularizer(squared=squared)
    assert reg.names == []  # no dense matrix: only adapters are trained
    assert len(reg.lowrank) == len(model.deltas()) == (3 if model_name == "conv" else 2)
    assert all(term.scale == 2.0 for term in reg.lowrank)
    with torch.no_grad():
        expected = sum(float(dense_reference(d, squared)) for d in model.deltas().values())
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)
    assert float(sum(reg.per_layer().values()).detach()) == pytest.approx(expected, rel=1e-5)


def test_unknown_estimator_and_bad_probes_are_rejected(conv_net):
    with pytest.raises(ValueError, match="unknown estimator"):
        OrthoReg(conv_net(), estimator="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probes"):
        OrthoReg(conv_net(), estimator="hutchinson", probes=0)


def test_orthoreg_hutchinson_estimator_averages_to_exact_squared_penalty(conv_net):
    """The estimator option plugs the unbiased probe estimate into the same selection."""
    model = conv_net()
    reference = {n: p.detach() - 0.2 for n, p in model.named_parameters()}
    exact = float(OrthoReg(model, reference=reference, squared=True)().detach())
    reg = OrthoReg(model, reference=reference, squared=True, estimator="hutchinson", probes=4,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        estimates = torch.stack([reg() for _ in range(400)])
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) < 4 * stderr < 0.1 * exact


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_lives_on_the_weights_device(conv_net):
    """On an accelerator θ0 is held on the weights' device and R matches the CPU value."""
    cpu_model = conv_net()
    reference = {n: p.detach() + 0.1 for n, p in cpu_model.named_parameters()}
    on_cpu = float(OrthoReg(cpu_model, reference=reference)().detach())
    reg = OrthoReg(conv_net().cuda(), reference=reference)
    assert all(group.reference.device.type == "cuda" for group in reg._groups)
    assert float(reg().detach()) == pytest.approx(on_cpu, rel=1e-4)
