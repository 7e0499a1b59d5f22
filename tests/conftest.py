"""Tiny shared models and data for the core tests: small enough that every test runs in ms.

``ConvNet`` has the layer kinds a CNN backbone has (3×3 conv, BatchNorm, 1×1 conv, linear);
``AttnNet`` has an ``nn.MultiheadAttention`` named ``attn`` so that the ``vit_attention``
presets (fused ``in_proj_weight`` + ``out_proj``) are exercised as they are on a ViT.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

FEATURES = 6
CLASSES = 4

# The tensors here are tiny: intra-op threads only add contention (100× slower on a busy
# 2-core machine) and make float reductions depend on the machine's thread count.
torch.set_num_threads(1)

# The processes tests start (the CLI, fine-tunes killed mid-run, DDP workers) load torch on
# GNU OpenMP, whose waiting threads spin unless told to sleep: beside other jobs that made a
# training step 8–26× slower (docs/PERFORMANCE.md, "Under load"). The CLI sets this itself
# (orthoreg.utils.threads); helper scripts run with `python script.py` do not.
if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


class ConvNet(nn.Module):
    """conv 3×3 → BN → GELU → pointwise 1×1 conv → GELU → mean-pool → linear features.

    GELU rather than ReLU: smooth in θ, so Taylor-expansion checks see no kinks.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, FEATURES)
        with torch.no_grad():  # non-trivial θ0 statistics, so "unchanged" is a real check
            self.bn.running_mean.normal_(0.0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.bn(self.conv(x)))
        h = F.gelu(self.pointwise(h))
        return self.fc(h.mean(dim=(2, 3)))


class AttnNet(nn.Module):
    """2×2 patches → linear embed → LayerNorm → self-attention ``attn`` → linear features."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, FEATURES)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 12)
        h = self.norm(self.embed(patches))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc((h + a).mean(dim=1))


ModelFactory = Callable[..., nn.Module]


@pytest.fixture
def conv_net() -> ModelFactory:
    """``conv_net(seed=0)``: a fresh ConvNet whose weights depend only on ``seed``."""

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return ConvNet()

    return make


@pytest.fixture
def attn_net() -> ModelFactory:
    """``attn_net(seed=0)``: a fresh AttnNet whose weights depend only on ``seed``."""

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return AttnNet()

    return make


@pytest.fixture
def head() -> nn.Module:
    """A fixed linear classification head over the backbone features."""
    torch.manual_seed(123)
    return nn.Linear(FEATURES, CLASSES)


@pytest.fixture
def images() -> TensorDataset:
    """32 random 3×8×8 images with labels in [0, CLASSES)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    y = torch.randint(0, CLASSES, (32,), generator=generator)
    return TensorDataset(x, y)


@pytest.fixture
def batch(images: TensorDataset) -> Tensor:
    """Eight input images for output comparisons."""
    return images.tensors[0][:8]
