"""Tangent (linearised) fine-tuning: f_lin(x; θ0 + Δ) = f(x; θ0) + J(x)·Δ."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from orthoreg.paradigms import Linear, LinearizedModel
from orthoreg.regularizer import orthoreg_penalty


def random_update(model: nn.Module, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for n, p in model.named_parameters()}


def moved(model: nn.Module, update: dict[str, Tensor], scale: float) -> nn.Module:
    """f(·; θ0 + scale·Δ), the non-linear model the tangent model approximates."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in out.named_parameters():
            param.add_(scale * update[name])
    return out


@pytest.mark.parametrize("which", ["conv", "attn"])
def test_linearised_model_equals_f0_at_zero_update(conv_net, attn_net, which, batch):
    """With Δ = 0 the tangent term is exactly 0 and f_lin is exactly f0 = f(x; θ0)."""
    base = conv_net() if which == "conv" else attn_net()
    model = Linear().prepare(copy.deepcopy(base))
    base.eval()
    with torch.no_grad():
        f0, tangent = model.value_and_jvp(batch, model.deltas())
        assert torch.equal(tangent, torch.zeros_like(tangent))
        assert torch.equal(model(batch), f0)
        if which == "conv":
            assert torch.equal(f0, base(batch))
        else:  # attention runs through the math kernel under forward AD, not the fused one
            torch.testing.assert_close(f0, base(batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["conv", "attn"])
def test_linearised_model_is_first_order_taylor_expansion(conv_net, attn_net, which, batch):
    """‖f_lin(θ0+tΔ) − f(θ0+tΔ)‖ = O(t²): halving t quarters the error (float64)."""
    base = (conv_net() if which == "conv" else attn_net()).double().eval()
    x = batch.double()
    update = random_update(base, seed=1)
    model = Linear().prepare(copy.deepcopy(base)).eval()
    errors = []
    with torch.no_grad():
        for scale in (2e-3, 1e-3, 5e-4):
            model.set_delta(update, alpha=scale)
            errors.append(float((model(x) - moved(base, update, scale)(x)).norm()))
    assert errors[0] > 1e-9  # the model is genuinely non-linear in θ
    for big, small in pairwise(errors):
        assert 3.5 < big / small < 4.5, errors


def test_task_vector_in_base_names_and_edited_reproduces_trained_model(conv_net, batch):
    """τ is named like θ0's parameters; ``Linear().edited(θ0, τ, α)`` is the trained model."""
    base = conv_net()
    model = Linear().prepare(copy.deepcopy(base))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
    vector = model.task_vector()
    assert list(vector) == [name for name, _ in base.named_parameters()]
    assert vector.metadata["paradigm"] == "linear"
    assert vector.norm() > 0
    edited = Linear().edited(copy.deepcopy(base), vector, alpha=1.0)
    assert isinstance(edited, LinearizedModel)
    model.eval()
    edited.eval()
    with torch.no_grad():
        trained_out = model(batch)
        assert torch.equal(edited(batch), trained_out)
        # linear in α: halfway between f0 and the fine-tuned tangent model
        half = Linear().edited(copy.deepcopy(base), vector, alpha=0.5).eval()(batch)
        torch.testing.assert_close(half, 0.5 * (base.eval()(batch) + trained_out))


def test_backbone_is_frozen_and_only_delta_trains(attn_net, batch):
    base = attn_net()
    model = Linear(select="vit_attention").prepare(copy.deepcopy(base))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "delta.attn__in_proj_weight", "delta.attn__out_proj__weight"]
    model.train()
    model(batch).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.delta.values())
    assert list(model.task_vector()) == ["attn.in_proj_weight", "attn.out_proj.weight"]


def test_linear_attention_model_runs_in_eval_under_no_grad(attn_net, batch):
    """Evaluation path (eval + no_grad): MHA's fused kernels have no JVP, must be avoided."""
    model = Linear().prepare(attn_net()).eval()
    with torch.no_grad():
        for delta in model.delta.values():
            delta.normal_(0.0, 1e-2)
        out = model(batch)
    assert torch.isfinite(out).all()
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


def test_linear_regularizer_penalises_delta_directly(conv_net):
    """Here the parameters *are* ΔW (reference 'zero'): R is taken of the deltas themselves."""
    model = Linear().prepare(conv_net())
    with torch.no_grad():
        for delta in model.delta.values():
            delta.normal_(0.0, 0.3)
    reg = model.regularizer(squared=True)
    assert sorted(reg.names) == ["delta.conv__weight", "delta.fc__weight",
                                 "delta.pointwise__weight"]
    with torch.no_grad():
        expected = sum(float(orthoreg_penalty(model.deltas()[n], squared=True))
                       for n in ("conv.weight", "pointwise.weight", "fc.weight"))
        assert float(reg()) == pytest.approx(expected, rel=1e-6)


def test_edited_with_vector_naming_unknown_parameter_fails(conv_net):
    from orthoreg.taskvector import TaskVector

    vector = TaskVector({"nope.weight": torch.zeros(2, 2)}, {"paradigm": "linear"})
    with pytest.raises(KeyError, match=r"nope\.weight"):
        Linear().edited(conv_net(), vector, 1.0)
