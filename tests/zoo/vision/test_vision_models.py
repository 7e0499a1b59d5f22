"""Backbones: strict weight loading, ImageNet sanity on real photos, frozen BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoreg.zoo.vision import models
from orthoreg.zoo.vision.models import SameConv2d, get_model

PRETRAINED = ["mobilenet_v2", "efficientnet_lite0"]


def _normalise(x: torch.Tensor, backbone: models.Backbone) -> torch.Tensor:
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _center_crop_224(rgb: np.ndarray) -> torch.Tensor:
    """ImageNet evaluation transform: short side to 256, centre crop 224, scale to [0, 1]."""
    x = torch.from_numpy(np.array(rgb[..., :3], dtype=np.float32)).permute(2, 0, 1)[None] / 255
    h, w = x.shape[-2:]
    factor = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="bilinear", antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return x[..., top : top + 224, left : left + 224]


def test_registry_names() -> None:
    assert set(models.MODELS) == {"mobilenet_v2", "efficientnet_lite0", "tiny_cnn"}
    with pytest.raises(KeyError, match="known"):
        get_model("resnet50")


def test_tiny_cnn_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = get_model("tiny_cnn", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    b = get_model("tiny_cnn", seed=0)
    c = get_model("tiny_cnn", seed=1)
    for (name, tensor_a), tensor_b in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(tensor_a, tensor_b), name
    assert not torch.equal(a.state_dict()["features.0.0.weight"], c.state_dict()["features.0.0.weight"])
    x = torch.randn(4, 3, 32, 32)
    assert a(x).shape == (4, a.feature_dim) == (4, 32)
    assert a.source is None
    with pytest.raises(ValueError, match="no pretrained ImageNet"):
        a.imagenet_head()


def test_train_mode_keeps_batchnorm_statistics_frozen() -> None:
    backbone = get_model("tiny_cnn")
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone.train()
    assert backbone.training
    batchnorms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    loss = backbone(torch.randn(8, 3, 32, 32) * 5 + 3).sum()
    loss.backward()
    after = {k: v for k, v in backbone.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Opting out restores ordinary BatchNorm training.
    backbone.freeze_bn_stats = False
    backbone.train()
    assert all(m.training for m in batchnorms)


@pytest.mark.parametrize("stride,size", [(1, 7), (2, 7), (2, 8), (2, 64)])
def test_same_conv_matches_tensorflow_padding(stride: int, size: int) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 3, stride=stride, bias=False)
    x = torch.randn(1, 2, size, size)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    total = max((out.shape[-1] - 1) * stride + 3 - size, 0)
    # TF puts the odd pixel of padding at the bottom/right.
    reference = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=stride)
    assert torch.allclose(out, reference)


@pytest.mark.assets
@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_weights_load_strictly_without_classifier(name: str, require_asset) -> None:
    spec = models.MODELS[name]
    require_asset(spec.asset)
    checkpoint = models.pretrained_state(name)
    backbone = get_model(name)
    body_keys = set(backbone.state_dict())
    head_keys = {k for k in checkpoint if k.startswith(spec.head_prefix)}
    assert body_keys | head_keys == set(checkpoint) and not body_keys & head_keys
    assert len(head_keys) == 2  # weight and bias of one Linear
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key
    assert not any(k.startswith(spec.head_prefix) for k, _ in backbone.named_parameters())
    head = backbone.imagenet_head()
    assert (head.out_features, head.in_features) == (1000, backbone.feature_dim) == (1000, 1280)
    assert backbone.source is not None and backbone.source["sha256"] == models.assets.get_asset(spec.asset).sha256
    assert not backbone.training
    # Strictness is real: a missing key is an error, not a silent random weight.
    truncated = dict(backbone.state_dict())
    truncated.pop(next(iter(truncated)))
    with pytest.raises(RuntimeError, match="Missing key"):
        models.MODELS[name].build().load_state_dict(truncated, strict=True)


@pytest.mark.assets
@pytest.mark.parametrize("name", PRETRAINED)
def test_imagenet_head_recognises_a_real_photo(name: str, require_asset) -> None:
    """Grace Hopper (ships with matplotlib): ImageNet's 'military uniform' (652) in the top 5."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    require_asset(models.MODELS[name].asset)
    backbone = get_model(name)
    photo = _center_crop_224(mpimg.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    noise = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(_normalise(torch.cat([photo, noise]), backbone))
        logits = backbone.imagenet_head()(features)
    assert features.shape == (2, 1280)
    assert 652 in logits[0].topk(5).indices.tolist()
    assert F.cosine_similarity(features[0], features[1], dim=0) < 0.9
    assert logits[0].softmax(-1).max() > logits[1].softmax(-1).max()


@pytest.mark.assets
@pytest.mark.parametrize("name", PRETRAINED)
def test_imagenet_head_sees_a_cat(name: str, require_asset) -> None:
    """skimage's chelsea is a tabby: a cat class (ImageNet 281–285). Skipped without skimage."""
    data = pytest.importorskip("skimage.data")
    require_asset(models.MODELS[name].asset)
    backbone = get_model(name)
    with torch.no_grad():
        logits = backbone.imagenet_head()(backbone(_normalise(_center_crop_224(data.chelsea()), backbone)))
    assert 281 <= int(logits.argmax()) <= 285


@pytest.mark.assets
@pytest.mark.parametrize("name", PRETRAINED)
def test_features_at_benchmark_resolution(name: str, require_asset) -> None:
    require_asset(models.MODELS[name].asset)
    backbone = get_model(name)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, backbone.feature_dim) and torch.isfinite(features).all()


STEMS = {
    "mobilenet_v2": lambda m: (m.features[0][0], m.features[0][1]),
    "efficientnet_lite0": lambda m: (m._conv_stem, m._bn0),
}


@pytest.mark.assets
@pytest.mark.parametrize("name", PRETRAINED)
def test_declared_normalisation_matches_trained_statistics(name: str, require_asset) -> None:
    """The stem's BatchNorm remembers the input scale it was trained on; ours must match.

    With the wrong normalisation (ImageNet mean/std for the TF-ported EfficientNet-Lite, or
    (x-0.5)/0.5 for MobileNetV2) the median variance ratio is ≈3.4 or ≈0.16 instead of ≈1.
    """
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    require_asset(models.MODELS[name].asset)
    backbone = get_model(name)
    photo = _center_crop_224(mpimg.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    conv, batchnorm = STEMS[name](backbone)
    with torch.no_grad():
        variance = conv(_normalise(photo, backbone)).var(dim=(0, 2, 3))
    ratio = float((variance / batchnorm.running_var).median())
    assert 0.4 < ratio < 2.5, ratio
