"""open_clip backbones from local weights, and zero-shot heads (tiny random ViT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoreg.clip.model import (
    ClipModelSpec,
    WeightsError,
    ZeroShotHead,
    build_zeroshot_head,
    head_fingerprint,
    load_clip,
    vision_backbone,
    zeroshot_head,
)

from .conftest import TINY_CONFIG, TINY_NAME, needs_open_clip

pytestmark = needs_open_clip
LAYERS = TINY_CONFIG["vision_cfg"]["layers"]


@pytest.fixture(scope="module")
def clip_model(tiny_weights: Path) -> nn.Module:
    return load_clip(TINY_NAME, tiny_weights)


@pytest.fixture(scope="module")
def spec(tiny_weights: Path) -> ClipModelSpec:
    return ClipModelSpec(TINY_NAME, str(tiny_weights))


def test_loads_the_file_weights_not_a_random_init(clip_model: nn.Module,
                                                  tiny_weights: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(tiny_weights))
    for name, tensor in clip_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_torch_save_format_loads_with_weights_only(clip_model: nn.Module, tmp_path: Path,
                                                   tiny_config: Path) -> None:
    path = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip_model.state_dict().items()}},
               path)
    loaded = load_clip(str(tiny_config), path)  # a .json config path works as --model too
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in clip_model.state_dict().items())


def test_missing_weights_file_is_a_clear_error(tmp_path: Path, tiny_config: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights file .*nope.safetensors not found: the CLIP "
                                           r"recipe never downloads weights"):
        load_clip(TINY_NAME, tmp_path / "nope.safetensors")


def test_weights_of_another_config_are_refused(tmp_path: Path, clip_model: nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in clip_model.state_dict().items()
             if not k.startswith("visual.proj")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"does not fit open_clip model .*missing keys"):
        load_clip(TINY_NAME, path)
    with pytest.raises(WeightsError, match="unknown open_clip model config 'ViT-Q-99'"):
        load_clip("ViT-Q-99", path)


def test_torchscript_and_pickled_code_are_refused(tmp_path: Path, tiny_config: Path) -> None:
    scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(tmp_path / "jit.pt"))
    with pytest.raises(WeightsError, match="TorchScript archive"):
        load_clip(TINY_NAME, tmp_path / "jit.pt")
    torch.save({"weights": nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module
    with pytest.raises(WeightsError, match="weights_only=True refuses pickled code"):
        load_clip(TINY_NAME, tmp_path / "module.pt")


def test_quick_gelu_is_applied_when_asked(tiny_weights: Path) -> None:
    from open_clip.transformer import QuickGELU

    def activations(model: nn.Module) -> set[type]:
        return {type(m) for m in model.visual.modules() if isinstance(m, nn.GELU | QuickGELU)}

    assert activations(load_clip(TINY_NAME, tiny_weights)) == {nn.GELU}
    assert activations(load_clip(TINY_NAME, tiny_weights, quick_gelu=True)) == {QuickGELU}


def test_backbone_names_attention_for_the_vit_presets(clip_model: nn.Module,
                                                      spec: ClipModelSpec) -> None:
    from orthoreg.clip.recipe import build_paradigm

    backbone = vision_backbone(clip_model, spec)
    attention = {n: m for n, m in backbone.named_modules() if n.endswith(".attn")}
    assert list(attention) == [f"visual.transformer.resblocks.{i}.attn" for i in range(LAYERS)]
    assert all(isinstance(m, nn.MultiheadAttention) for m in attention.values())
    import copy

    partial = build_paradigm("partial").prepare(copy.deepcopy(backbone))
    assert sorted(partial.trained) == sorted(
        f"visual.transformer.resblocks.{i}.attn.{leaf}"
        for i in range(LAYERS) for leaf in ("in_proj_weight", "out_proj.weight"))
    lora = build_paradigm("lora").prepare(copy.deepcopy(backbone))
    assert sorted(lora.deltas()) == sorted(partial.trained)
    # the backbone's names are the CLIP checkpoint's own keys
    assert set(backbone.state_dict()) <= set(clip_model.state_dict())


def test_backbone_normalises_uint8_like_clip_preprocessing(clip_model: nn.Module,
                                                           spec: ClipModelSpec) -> None:
    backbone = vision_backbone(clip_model, spec).eval()
    assert backbone.image_size == 32 and backbone.feature_dim == TINY_CONFIG["embed_dim"]
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clip_model.encode_image((pixels.float() / 255 - mean) / std)
        assert torch.allclose(backbone(pixels), expected, atol=1e-6)
    assert "pixel_mean" not in backbone.state_dict()  # not part of θ0


def test_zero_shot_head_is_the_normalised_template_average(clip_model: nn.Module) -> None:
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    templates = ("a photo of a {}.", "a {} in the wild.")
    head = build_zeroshot_head(clip_model, tokenizer, ["cat", "dog", "bird"], templates)
    assert head.weight.shape == (3, TINY_CONFIG["embed_dim"])
    with torch.no_grad():
        text = clip_model.encode_text(tokenizer(["a dog in the wild.", "a photo of a dog."]))
    row = F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1)
    assert torch.allclose(head.weight[1], row, atol=1e-6)
    assert torch.allclose(head.weight.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert float(head.scale) == pytest.approx(float(clip_model.logit_scale.exp()))
    assert list(head.parameters()) == []  # frozen: buffers only
    features = torch.randn(4, TINY_CONFIG["embed_dim"])
    logits = head(features)
    assert torch.allclose(logits, head.scale * F.normalize(features, dim=-1) @ head.weight.T)


def test_heads_are_cached_by_fingerprint(clip_model: nn.Module, spec: ClipModelSpec,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orthoreg.clip.model as clip_module

    names, templates = ["0", "1", "2"], ('a photo of the number: "{}".',)
    first = zeroshot_head(clip_model, spec, "MNIST", names, templates, tmp_path)
    files = list((tmp_path / "heads").glob("MNIST-*.safetensors"))
    assert len(files) == 1 and head_fingerprint(spec, names, templates) in files[0].name

    def refuse(*args: object, **kwargs: object) -> ZeroShotHead:
        raise AssertionError("a cached head was rebuilt")

    monkeypatch.setattr(clip_module, "build_zeroshot_head", refuse)
    again = zeroshot_head(clip_model, spec, "MNIST", names, templates, tmp_path)
    assert torch.equal(again.weight, first.weight) and again.metadata["classnames"] == names
    assert head_fingerprint(spec, names, ("{}",)) != head_fingerprint(spec, names, templates)
    assert head_fingerprint(spec, ["0", "1", "3"], templates) != head_fingerprint(
        spec, names, templates)
