"""Penalty forms (DESIGN §1): ``paper``, ``shape``, ``growth`` against float64 references.

Every implementation a form has — dense (``orthoreg_penalty``/``batched_penalty``), fused
groups (``fused_penalty``), low-rank (LoRA) and ``accumulate_grad`` — is checked against a
reference written differently from it: ``shape`` through n²·tr G²/(tr G)² − n rather than
‖G/ḡ − I‖, ``growth`` and ``paper`` through their closed-form gradients. Also: the
properties that make the forms controls (R_shape is scale-invariant with ⟨∇R, ΔW⟩ = 0;
growth is the paper form's small-ΔW limit), the guard at ΔW = 0, the ``matrices`` rule,
regime read-outs, and the one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from orthoreg.paradigms import Full, Linear, Lora
from orthoreg.regularizer import (
    MATRIX_RULES,
    PENALTY_FORMS,
    OrthoReg,
    batched_penalty,
    fused_penalty,
    lowrank_penalty,
    mean_floor,
    orthoreg_penalty,
)
from orthoreg.training import TrainConfig, finetune

FORMS = ("paper", "shape", "growth")
SHAPES = {
    "tall": (9, 4),
    "wide": (4, 9),
    "square": (6, 6),
    "conv_wide": (5, 3, 3, 3),  # (out, in·kh·kw) = (5, 27)
    "conv_tall": (20, 2, 2, 2),  # (20, 8)
}


# --------------------------------------------------------------------------- references
def as_double_matrix(delta: Tensor) -> Tensor:
    return delta.reshape(delta.shape[0], -1).double()


def smaller_gram(matrix: Tensor) -> Tensor:
    rows, cols = matrix.shape
    return matrix.T @ matrix if rows >= cols else matrix @ matrix.T


def reference_value(delta: Tensor, form: str, squared: bool) -> Tensor:
    """The forms' definitions in float64, differentiable, written independently."""
    matrix = as_double_matrix(delta)
    gram = smaller_gram(matrix)
    n = gram.shape[0]
    if form == "paper":
        value = torch.linalg.norm(gram - torch.eye(n, dtype=torch.float64)) ** 2
    elif form == "shape":  # ‖G/ḡ − I‖² = n²·tr G²/(tr G)² − n
        value = n**2 * (gram * gram).sum() / torch.trace(gram) ** 2 - n
    else:  # growth
        value = n - 2 * (matrix * matrix).sum()
        return value if squared else (value + n) / (2 * math.sqrt(n))  # √n − ‖Δ‖²/√n
    return value if squared else value.sqrt()


def reference_gradient(delta: Tensor, form: str, squared: bool) -> Tensor:
    """∇R in closed form (paper, growth) or by autograd through the trace formula (shape)."""
    matrix = as_double_matrix(delta)
    rows, cols = matrix.shape
    n = min(rows, cols)
    if form == "growth":
        grad = -4 * matrix if squared else -(2 / math.sqrt(n)) * matrix
    elif form == "paper":
        residual = smaller_gram(matrix) - torch.eye(n, dtype=torch.float64)
        grad = 4 * (matrix @ residual if rows >= cols else residual @ matrix)
        if not squared:
            grad = grad / (2 * torch.linalg.norm(residual))
    else:
        leaf = delta.detach().double().requires_grad_()
        (grad,) = torch.autograd.grad(reference_value(leaf, form, squared), leaf)
        return grad
    return grad.reshape(delta.shape)


def random_delta(shape: tuple[int, ...], seed: int, std: float = 0.4) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def cases() -> list[tuple[str, bool, tuple[int, ...]]]:
    return [(form, squared, shape) for form in FORMS for squared in (False, True)
            for shape in SHAPES.values()]


def case_id(case: tuple[str, bool, tuple[int, ...]]) -> str:
    form, squared, shape = case
    return f"{form}-{'squared' if squared else 'plain'}-{'x'.join(map(str, shape))}"


# --------------------------------------------------------------------------- values, gradients
@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_dense_form_matches_float64_reference(case):
    form, squared, shape = case
    delta = random_delta(shape, seed=sum(shape)).requires_grad_()
    value = orthoreg_penalty(delta, squared=squared, form=form)
    (grad,) = torch.autograd.grad(value, delta)
    torch.testing.assert_close(value.detach(), reference_value(delta.detach(), form, squared),
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grad, reference_gradient(delta.detach(), form, squared),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_fused_group_matches_float64_reference(case):
    """The batched path with its hand-written backward: W − W0 for a group of three."""
    form, squared, shape = case
    generator = torch.Generator().manual_seed(len(shape) + shape[0])
    references = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [(r + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64))
               .requires_grad_() for r in references]
    values = fused_penalty(weights, references, squared=squared, form=form)
    upstream = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64)
    grads = torch.autograd.grad((values * upstream).sum(), weights)
    for value, grad, weight, ref, up in zip(values, grads, weights, references, upstream):
        delta = (weight - ref).detach()
        torch.testing.assert_close(value.detach(), reference_value(delta, form, squared),
                                   rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(grad, up * reference_gradient(delta, form, squared),
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [False, True])
def test_batched_penalty_equals_per_matrix_form(form, squared):
    stack = random_delta((4, 7, 5), seed=3).requires_grad_()
    batched = batched_penalty(stack, squared=squared, form=form)
    looped = torch.stack([orthoreg_penalty(d, squared, form) for d in stack.unbind(0)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [False, True])
def test_float32_fused_form_close_to_float64(form, squared):
    """What training runs (float32, blocked Gram at n ≥ 256) stays within float32 tolerance."""
    delta = random_delta((300, 260), seed=9, std=0.05)
    value = fused_penalty([delta.float()], squared=squared, form=form)[0]
    torch.testing.assert_close(value.double(), reference_value(delta, form, squared),
                               rtol=2e-5, atol=1e-4)


# --------------------------------------------------------------------------- shape: properties
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shape_gradient_is_orthogonal_to_the_update(shape, squared):
    """Euler: R_shape is homogeneous of degree 0, so ⟨∇R, ΔW⟩ = 0 — it never grows ΔW."""
    delta = random_delta(shape, seed=21).requires_grad_()
    (dense,) = torch.autograd.grad(orthoreg_penalty(delta, squared, "shape"), delta)
    (fused,) = torch.autograd.grad(fused_penalty([delta], squared=squared, form="shape")[0],
                                   delta)
    for grad in (dense, fused):
        assert grad.abs().max() > 1e-3  # a real gradient, orthogonal to ΔW
        inner = float((grad * delta.detach()).sum())
        assert abs(inner) < 1e-12 * float(grad.norm() * delta.detach().norm())


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 0.5, 7.0, 1e4])
def test_shape_is_scale_invariant(scale, squared):
    delta = random_delta((12, 7), seed=4)
    expected = orthoreg_penalty(delta, squared, "shape")
    scaled = orthoreg_penalty(scale * delta, squared, "shape")
    fused = fused_penalty([scale * delta], squared=squared, form="shape")[0]
    torch.testing.assert_close(scaled, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)


def test_shape_is_zero_exactly_when_all_singular_values_are_equal():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 4, generator=generator, dtype=torch.float64))
    for scale in (1e-3, 1.0, 30.0):  # any multiple of a Stiefel matrix: a flat spectrum
        assert float(orthoreg_penalty(scale * q, form="shape")) < 1e-12
        assert float(fused_penalty([scale * q.T], form="shape")[0]) < 1e-12
    # one singular value off: positive, and equal to the closed form from the spectrum
    u, _, v = torch.linalg.svd(torch.randn(10, 4, generator=generator, dtype=torch.float64),
                               full_matrices=False)
    sigma = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    squares = sigma**2
    expected = torch.linalg.norm(squares / squares.mean() - 1.0)
    value = orthoreg_penalty(u @ torch.diag(sigma) @ v, form="shape")
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_shape_at_zero_update_is_zero_with_zero_gradient_in_every_path(squared):
    """R_shape is undefined at ΔW = 0; it is defined there as 0 with ∇R = 0 (no NaN)."""
    delta = torch.zeros(6, 4, requires_grad=True)
    value = orthoreg_penalty(delta, squared, "shape")
    value.backward()
    assert float(value) == 0.0 and torch.equal(delta.grad, torch.zeros(6, 4))
    weights = [torch.zeros(6, 4, requires_grad=True) for _ in range(2)]
    fused = fused_penalty(weights, squared=squared, form="shape")
    fused.sum().backward()
    assert torch.equal(fused, torch.zeros(2))
    assert all(torch.equal(w.grad, torch.zeros(6, 4)) for w in weights)
    A = torch.randn(2, 4, requires_grad=True)
    B = torch.zeros(6, 2, requires_grad=True)  # a fresh LoRA adapter: B = 0
    low = lowrank_penalty(A, B, 2.0, squared, "shape")
    grad_a, grad_b = torch.autograd.grad(low, (A, B))
    assert float(low) == 0.0
    assert torch.equal(grad_a, torch.zeros_like(A)) and torch.equal(grad_b, torch.zeros_like(B))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-12, 1e-6])
def test_shape_is_finite_for_tiny_float32_updates(scale, squared):
    """Down to ΔW = 1e-30·randn (where ḡ is clamped below by mean_floor, or tr G underflows to 0)."""
    weight = (scale * torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
              ).requires_grad_()
    value = fused_penalty([weight], squared=squared, form="shape")[0]
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(weight.grad).all()
    assert mean_floor(torch.float32) == pytest.approx(math.sqrt(torch.finfo(torch.float32).tiny))


# --------------------------------------------------------------------------- growth: properties
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 2, 2, 2)])
def test_growth_gradient_is_the_paper_forms_small_update_limit(shape, squared):
    """‖∇R_growth − ∇R_paper‖/‖∇R_paper‖ is O(σ²): it shrinks ~100× per 10× smaller ΔW."""
    base = random_delta(shape, seed=8, std=1.0)

    def gradient(delta: Tensor, form: str) -> Tensor:
        leaf = delta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(orthoreg_penalty(leaf, squared, form), leaf)
        return grad

    errors = []
    for scale in (1e-1, 1e-2, 1e-3):
        paper, growth = gradient(scale * base, "paper"), gradient(scale * base, "growth")
        torch.testing.assert_close(growth, reference_gradient(scale * base, "growth", squared))
        errors.append(float((growth - paper).norm() / paper.norm()))
    assert errors[0] < 0.5
    assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30, errors


@pytest.mark.parametrize("squared", [False, True])
def test_growth_value_equals_paper_at_zero_and_to_first_order(squared):
    base = random_delta((9, 4), seed=2, std=1.0)
    zero = torch.zeros(9, 4, dtype=torch.float64)
    assert float(orthoreg_penalty(zero, squared, "growth")) == pytest.approx(
        float(orthoreg_penalty(zero, squared, "paper")))
    gaps = [abs(float(orthoreg_penalty(s * base, squared, "growth")
                      - orthoreg_penalty(s * base, squared, "paper"))) for s in (1e-1, 1e-2)]
    assert gaps[1] < gaps[0] / 1000  # the difference is O(‖ΔW‖⁴): second order in tr G


# --------------------------------------------------------------------------- low-rank
LORA_CASES = [((3, 12), (20, 3), 0.5), ((3, 20), (12, 3), 2.0), ((5, 16), (16, 5), 1.0),
              ((2, 4, 3, 3), (10, 2, 1, 1), 1.5), ((16, 12), (20, 16), 1.0)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("a_shape,b_shape,scale", LORA_CASES)
def test_lowrank_form_equals_dense_form_of_merged_update(a_shape, b_shape, scale, squared, form):
    generator = torch.Generator().manual_seed(sum(a_shape) + 7 * sum(b_shape))
    A = (torch.randn(a_shape, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    B = (torch.randn(b_shape, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    value = lowrank_penalty(A, B, scale, squared, form)
    grad_a, grad_b = torch.autograd.grad(value, (A, B))
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    merged = scale * B_ref.reshape(b_shape[0], -1) @ A_ref.reshape(a_shape[0], -1)
    expected = reference_value(merged, form, squared)
    ref_a, ref_b = torch.autograd.grad(expected, (A_ref, B_ref))
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_a, ref_a, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(grad_b, ref_b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_lowrank_shape_floor_is_attained_by_equal_nonzero_singular_values(rank):
    """rank r < n: R_shape ≥ √(n(n − r)/r), with equality for orthonormal factors."""
    n = 10
    generator = torch.Generator().manual_seed(rank)
    floor = math.sqrt(n * (n - rank) / rank)
    for _ in range(5):
        A = torch.randn(rank, n, generator=generator, dtype=torch.float64)
        B = torch.randn(2 * n, rank, generator=generator, dtype=torch.float64)
        assert float(lowrank_penalty(A, B, 1.0, form="shape")) >= floor - 1e-9
    q_a, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
    q_b, _ = torch.linalg.qr(torch.randn(2 * n, rank, generator=generator, dtype=torch.float64))
    assert float(lowrank_penalty(q_a.T, 3.0 * q_b, 0.7, form="shape")) == pytest.approx(floor)


# --------------------------------------------------------------------------- OrthoReg
def _perturbed(model: nn.Module, seed: int = 3, std: float = 0.2) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(std * torch.randn(param.shape, generator=generator))
    return model


PARADIGMS = {"full": Full, "linear": Linear,
             "lora": lambda: Lora(targets=["conv", "pointwise", "fc"], rank=2, alpha=4.0)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_accumulate_grad_equals_autograd_backward(conv_net, paradigm, squared, form):
    """reg.accumulate_grad(λ) adds exactly what (λ·reg()).backward() adds, onto existing grads."""
    torch.manual_seed(0)
    model = _perturbed(PARADIGMS[paradigm]().prepare(conv_net()))
    reg = model.regularizer(squared=squared, form=form)
    assert reg.form == form
    params = [p for p in model.parameters() if p.requires_grad]
    seeded = [torch.randn_like(p) for p in params]
    for p, g in zip(params, seeded):
        p.grad = g.clone()
    expected = (2.5 * reg())
    expected.backward()
    autograd = [p.grad.clone() for p in params]
    for p, g in zip(params, seeded):
        p.grad = g.clone()
    value = reg.accumulate_grad(2.5)
    torch.testing.assert_close(value, expected.detach() / 2.5, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip((p.grad for p in params), autograd):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_orthoreg_form_equals_sum_of_per_matrix_references(conv_net, paradigm, form):
    torch.manual_seed(0)
    model = _perturbed(PARADIGMS[paradigm]().prepare(conv_net()))
    reg = model.regularizer(form=form)
    with torch.no_grad():
        expected = sum(float(reference_value(d, form, False)) for d in model.deltas().values()
                       if d.ndim >= 2)
        assert float(reg()) == pytest.approx(expected, rel=1e-5)
        assert float(sum(reg.per_layer().values())) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("form", ["shape", "growth"])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_finetune_from_zero_update_stays_finite(conv_net, head, images, paradigm, form):
    """The first AdamW step starts at ΔW = 0 (B = 0 for LoRA): shape's guard keeps it finite."""
    torch.manual_seed(1)
    model = PARADIGMS[paradigm]().prepare(conv_net())
    reg = model.regularizer(form=form)
    assert torch.isfinite(reg()) and (form != "shape" or float(reg()) == 0.0)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, lam=1.0, form=form,
                      log_every=1, progress=False)
    result = finetune(model, head, images, cfg)
    assert all(math.isfinite(h["penalty"]) and math.isfinite(h["loss"]) for h in result.history)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(float(v.abs().max()) > 0 for v in model.deltas().values())


# --------------------------------------------------------------------------- matrices rule
def test_matrices_2d_excludes_conv_kernels_and_ndim2_includes_them(conv_net):
    model = conv_net()
    assert OrthoReg(model).names == ["conv.weight", "pointwise.weight", "fc.weight"]
    assert OrthoReg(model, matrices="ndim>=2").names == OrthoReg(model).names
    assert OrthoReg(model, matrices="2d").names == ["fc.weight"]
    full = Full().prepare(conv_net())
    assert full.regularizer(matrices="2d").names == ["fc.weight"]
    assert "conv.weight" in full.regularizer().names
    lora = Lora(targets=["conv", "fc"], rank=2).prepare(conv_net())  # conv LoRA: a 4-D ΔW
    assert [t.name for t in lora.regularizer(matrices="2d").lowrank] == ["fc[default]"]
    assert len(lora.regularizer().lowrank) == 2


def test_2d_rule_excludes_a_patch_embedding_conv():
    """The ViT case the authors' rule is for: a 4-D patch-embedding conv before 2-D layers."""
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4, bias=False), nn.Flatten(), nn.Linear(8, 5))
    assert OrthoReg(model, matrices="2d").names == ["2.weight"]
    assert OrthoReg(model).names == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match=r"selected no parameters.*matrices='2d'"):
        OrthoReg(nn.Conv2d(3, 8, 4), matrices="2d")


# --------------------------------------------------------------------------- errors
def test_unknown_form_lists_the_known_ones(conv_net):
    for call in (lambda: OrthoReg(conv_net(), form="spectral"),
                 lambda: orthoreg_penalty(torch.zeros(3, 2), form="spectral"),
                 lambda: lowrank_penalty(torch.zeros(1, 3), torch.zeros(2, 1), 1.0,
                                         form="spectral"),
                 lambda: fused_penalty([torch.zeros(3, 2)], form="spectral")):
        with pytest.raises(ValueError, match=r"unknown form 'spectral'; choose from "
                                             r"\['growth', 'paper', 'shape'\]"):
            call()


@pytest.mark.parametrize("form", ["shape", "growth"])
def test_hutchinson_estimator_refuses_other_forms(conv_net, form):
    with pytest.raises(ValueError, match=f"estimator='hutchinson' does not support form='{form}'"):
        OrthoReg(conv_net(), estimator="hutchinson", form=form)
    with pytest.raises(ValueError, match=f"estimator='hutchinson' does not support form='{form}'"):
        TrainConfig(estimator="hutchinson", form=form)


def test_unknown_matrices_rule_lists_the_known_ones(conv_net):
    with pytest.raises(ValueError, match=r"unknown matrices='3d'; choose from \['2d', 'ndim>=2'\]"):
        OrthoReg(conv_net(), matrices="3d")


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -1.0])
def test_accumulate_grad_refuses_a_bad_lambda_before_touching_grads(conv_net, lam):
    model = _perturbed(Full().prepare(conv_net()))
    reg = model.regularizer()
    with pytest.raises(ValueError, match=r"^lam must be a finite number ≥ 0, got"):
        reg.accumulate_grad(lam)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"invalid lam"):
        TrainConfig(lam=lam)


def test_config_choices_follow_the_registries():
    """The experiment config spells the form and matrices names out; they must not drift."""
    from orthoreg.errors import ConfigError
    from orthoreg.experiment.config import from_mapping

    base = {"paradigms": {"full": {}}}
    for form in PENALTY_FORMS:
        assert from_mapping({**base, "train": {"form": form}}).train.form == form
    for rule in MATRIX_RULES:
        assert from_mapping({**base, "train": {"matrices": rule}}).train.matrices == rule
    with pytest.raises(ConfigError, match=r"train\.form.*'paper', 'shape', 'growth'"):
        from_mapping({**base, "train": {"form": "spectral"}})
    with pytest.raises(ConfigError, match=r"train\.matrices"):
        from_mapping({**base, "train": {"matrices": "3d"}})


# --------------------------------------------------------------------------- regime read-out
def test_regime_matches_singular_values_of_the_update(conv_net):
    torch.manual_seed(0)
    model = _perturbed(Full().prepare(conv_net()), std=0.05)
    reg = model.regularizer(form="shape")  # the read-out is the paper form's whatever the form
    regime = reg.regime()
    assert list(regime) == reg.names
    for name, delta in model.deltas().items():
        if delta.ndim < 2:
            continue
        entry = regime[name]
        sigma = torch.linalg.svdvals(as_double_matrix(delta.detach()))
        assert entry["n"] == sigma.numel()
        assert entry["sigma_max"] == pytest.approx(float(sigma.max()), rel=1e-5)
        assert entry["sigma_median"] == pytest.approx(float(sigma.quantile(0.5)), rel=1e-4)
        assert entry["fro"] == pytest.approx(float(sigma.norm()), rel=1e-5)
        paper = float(reference_value(delta.detach(), "paper", False))
        assert entry["r_over_sqrt_n"] == pytest.approx(paper / math.sqrt(sigma.numel()), rel=1e-5)


def test_regime_of_lora_adapters_from_their_factors(conv_net):
    model = Lora(targets=["conv", "pointwise", "fc"], rank=2, alpha=4.0).prepare(conv_net())
    _perturbed(model, std=0.3)
    reg = model.regularizer()
    regime = reg.regime()
    deltas = dict(zip([t.name for t in reg.lowrank], model.deltas().values()))
    for name, delta in deltas.items():
        sigma = torch.linalg.svdvals(as_double_matrix(delta.detach()))  # n values, n − 2 zeros
        entry = regime[name]
        assert entry["n"] == sigma.numel()
        assert entry["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-5)
        assert entry["sigma_median"] == pytest.approx(float(sigma[:2].mean()), rel=1e-5)
        assert entry["fro"] == pytest.approx(float(sigma.norm()), rel=1e-5)
        paper = float(reference_value(delta.detach(), "paper", False))
        assert entry["r_over_sqrt_n"] == pytest.approx(paper / math.sqrt(sigma.numel()), rel=1e-5)


def test_regime_at_zero_update_is_the_weight_decay_regime(conv_net):
    regime = Full().prepare(conv_net()).regularizer().regime()
    for entry in regime.values():
        assert entry["sigma_max"] == 0.0 and entry["fro"] == 0.0
        assert entry["r_over_sqrt_n"] == pytest.approx(1.0)
