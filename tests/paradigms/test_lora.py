"""LoRA through PEFT: the task vector is the merged dense update s·B·A, in base names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orthoreg.paradigms import Lora


def randomise_lora_b(model: nn.Module, seed: int = 0) -> None:
    """PEFT initialises B = 0 (ΔW = 0); give it values so the update is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_conv_and_linear_task_vector_equals_peft_merged_difference(conv_net):
    """τ = W_merged − W0, where PEFT's own ``merge()`` gives W_merged (deep copy)."""
    base = conv_net()
    model = Lora(targets=["conv", "pointwise", "fc"], rank=3, alpha=6.0).prepare(conv_net())
    randomise_lora_b(model)
    vector = model.task_vector()
    assert sorted(vector) == ["conv.weight", "fc.weight", "pointwise.weight"]
    assert vector.metadata["paradigm"] == "lora"
    merged = copy.deepcopy(model.backbone)
    for module in merged.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()
    merged_weights = {"conv.weight": merged.conv.base_layer.weight,
                      "pointwise.weight": merged.pointwise.base_layer.weight,
                      "fc.weight": merged.fc.base_layer.weight}
    for name, weight in merged_weights.items():
        expected = weight.detach() - dict(base.named_parameters())[name].detach()
        torch.testing.assert_close(vector[name], expected, rtol=1e-5, atol=1e-6)


def test_attention_task_vector_names_and_values(attn_net):
    """MHA adapters map to ``attn.in_proj_weight`` and ``attn.out_proj.weight``, τ = s·B·A.

    (Compared with the factors, not PEFT's MHA ``merge()``, which adds the out_proj delta
    twice in PEFT 0.21, huggingface/peft#3774.)
    """
    model = Lora(targets="vit_attention", rank=2, alpha=8.0).prepare(attn_net())
    randomise_lora_b(model)
    vector = model.task_vector()
    assert sorted(vector) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    attn = model.backbone.attn
    for name, layer in (("attn.in_proj_weight", attn), ("attn.out_proj.weight",
                                                         attn.base_layer.out_proj)):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(vector[name], 4.0 * (b @ a).detach())
        assert vector[name].shape == dict(attn_net().named_parameters())[name].shape


@pytest.mark.parametrize("which,targets", [("conv", ["conv", "pointwise", "fc"]),
                                           ("conv", "pointwise"),
                                           ("attn", "vit_attention")])
def test_applying_task_vector_to_base_reproduces_lora_model(conv_net, attn_net, which,
                                                           targets, batch):
    """f(x; θ0 + τ) = f_LoRA(x): the vector is exactly what the adapters compute."""
    make = conv_net if which == "conv" else attn_net
    base = make()
    model = Lora(targets=targets, rank=2, alpha=4.0).prepare(make()).eval()
    randomise_lora_b(model)
    with torch.no_grad():
        lora_out = model(batch)
        edited = model.task_vector().apply_to(base).eval()
        torch.testing.assert_close(edited(batch), lora_out, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(make().eval()(batch), lora_out, atol=1e-3)  # τ matters


def test_forward_and_backward_never_touch_frozen_base_weights(attn_net, batch):
    """θ0 stays bit-identical through training passes (PEFT's MHA merge/unmerge drifts it)."""
    base = attn_net()
    model = Lora(targets="vit_attention", rank=2).prepare(attn_net())
    randomise_lora_b(model)
    model.train()
    for _ in range(3):
        model(batch).square().mean().backward()
    state = model.backbone.state_dict()
    for name, tensor in base.state_dict().items():
        key = {"attn.in_proj_weight": "attn.base_layer.in_proj_weight",
               "attn.in_proj_bias": "attn.base_layer.in_proj_bias",
               "attn.out_proj.weight": "attn.base_layer.out_proj.base_layer.weight",
               "attn.out_proj.bias": "attn.base_layer.out_proj.base_layer.bias"}.get(name, name)
        assert torch.equal(state[key], tensor), name
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)


def test_lora_rejects_bad_rank_and_targets_matching_nothing(conv_net):
    with pytest.raises(ValueError, match="rank"):
        Lora(rank=0)
    with pytest.raises(ValueError, match="match no"):
        Lora(targets="vit_attention").prepare(conv_net())
