"""The paradigm registry, full fine-tuning and partial (attention-only / pointwise) FT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthoreg.paradigms import PARADIGMS, Full, Partial, get_paradigm


def perturb_trainable(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Stand-in for training: move every trainable tensor by a random amount."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few real optimiser steps in train mode (BatchNorm would update its stats here)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_registry_names_and_unknown_name_error():
    assert set(PARADIGMS) == {"full", "linear", "partial", "lora"}
    assert isinstance(get_paradigm("partial", select="pointwise"), Partial)
    with pytest.raises(KeyError, match=r"unknown paradigm 'fulll'.*'full'"):
        get_paradigm("fulll")


def test_full_task_vector_is_theta_minus_theta0_over_all_parameters(conv_net):
    """τ covers every parameter (weights, biases, BN affine) in base names, τ = θ − θ0."""
    base = conv_net()
    model = Full().prepare(conv_net())
    perturb_trainable(model)
    vector = model.task_vector()
    assert list(vector) == [name for name, _ in base.named_parameters()]
    trained = dict(model.backbone.named_parameters())
    for name, theta0 in base.named_parameters():
        assert torch.equal(vector[name], trained[name].detach() - theta0.detach())
    assert vector.metadata["paradigm"] == "full"
    assert vector.metadata["base_fingerprint"] == model.base_fingerprint


def test_full_training_leaves_batchnorm_statistics_at_theta0(conv_net, batch):
    """BN running stats belong to θ0: ``train()`` keeps BN in eval, so they never move."""
    base = conv_net()
    model = Full().prepare(conv_net())
    sgd_steps(model, batch)
    assert model.training and not model.backbone.bn.training
    for name, buffer in base.named_buffers():
        assert torch.equal(dict(model.backbone.named_buffers())[name], buffer), name
    assert not torch.equal(model.backbone.conv.weight, base.conv.weight)  # it did train


def test_full_regularizer_covers_matrices_against_theta0(conv_net):
    model = Full().prepare(conv_net())
    reg = model.regularizer()
    assert reg.names == ["conv.weight", "pointwise.weight", "fc.weight"]
    assert float(reg().detach()) == pytest.approx(2 * 8**0.5 + 6**0.5)  # ΔW = 0 at the start


def test_partial_vit_attention_trains_only_qkv_and_out_projection(attn_net, batch):
    """``vit_attention``: the fused in_proj_weight and out_proj.weight, never their biases."""
    base = attn_net()
    model = Partial("vit_attention").prepare(attn_net())
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert model.regularizer().names == ["attn.in_proj_weight", "attn.out_proj.weight"]
    sgd_steps(model, batch)
    now = dict(model.backbone.named_parameters())
    for name, theta0 in base.named_parameters():
        assert torch.equal(now[name], theta0) == (name not in trained), name
    vector = model.task_vector()
    assert sorted(vector) == sorted(trained)
    for name in trained:
        assert torch.equal(vector[name], now[name].detach() - dict(base.named_parameters())[name])


def test_partial_pointwise_trains_only_one_by_one_convolutions(conv_net):
    model = Partial("pointwise").prepare(conv_net())
    assert [n for n, p in model.backbone.named_parameters() if p.requires_grad] == [
        "pointwise.weight"]
    assert list(model.task_vector()) == ["pointwise.weight"]


def test_partial_globs_and_empty_selection_error(conv_net):
    model = Partial(["fc.*"]).prepare(conv_net())
    assert sorted(model.task_vector()) == ["fc.bias", "fc.weight"]
    with pytest.raises(ValueError, match="'vit_attention' matches no parameter of ConvNet"):
        Partial("vit_attention").prepare(conv_net())
