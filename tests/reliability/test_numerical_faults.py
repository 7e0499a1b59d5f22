"""NaN/inf in the loss, the penalty or a gradient stops the run, naming the step and the
first offending parameter, and the last good checkpoint stays intact and resumable.

Faults are injected mid-run: a weight set to inf from ``on_log``, a gradient hook that
returns NaN. The model has a trainable matrix that the forward pass does not use, so the
penalty can go non-finite while the task loss stays finite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orthoreg.errors import OrthoRegError
from orthoreg.paradigms import get_paradigm
from orthoreg.training import CHECKPOINT, NonFiniteError, TrainConfig, Trainer, finetune
from orthoreg.utils.io import read_tensors


class Net(nn.Module):
    """conv → GELU → 1×1 conv → pool → linear; ``spare`` is trained but unused forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 6)
        self.spare = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.pointwise(F.gelu(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def make_model():
    torch.manual_seed(0)
    return get_paradigm("full").prepare(Net())


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 3, 8, 8, generator=generator),
                         torch.randint(0, 4, (32,), generator=generator))


def head() -> nn.Module:
    torch.manual_seed(2)
    return nn.Linear(6, 4)


def config(**overrides) -> TrainConfig:
    base = dict(steps=8, batch_size=8, lr=1e-2, warmup_steps=0, lam=0.1, checkpoint_every=2,
                log_every=1, progress=False)
    return TrainConfig(**{**base, **overrides})


def set_to_inf(model: nn.Module, name: str, at_step: int):
    params = dict(model.named_parameters())

    def on_log(record: dict[str, float]) -> None:
        if record["step"] == at_step:
            with torch.no_grad():
                params[name].view(-1)[0] = float("inf")

    return on_log


def assert_intact_checkpoint(workdir: Path, step: int, cfg: TrainConfig | None = None) -> None:
    """The checkpoint holds ``step``, only finite tensors, and a fresh trainer resumes it."""
    cfg = cfg or config()
    tensors, meta = read_tensors(workdir / CHECKPOINT)
    assert meta["step"] == step
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    resumed = Trainer(make_model(), head(), data(), cfg, workdir)
    assert resumed.try_resume() == step
    result = resumed.run()
    assert result.steps == 8 and result.resumed_from == step


def test_non_finite_task_loss_names_step_and_parameter(tmp_path: Path):
    """A weight turned inf after step 3 (checkpoint at 2): step 4's loss is NaN."""
    model = make_model()
    with pytest.raises(NonFiniteError) as caught:
        finetune(model, head(), data(), config(), tmp_path,
                 on_log=set_to_inf(model, "backbone.pointwise.weight", at_step=3))
    message = str(caught.value)
    assert "step 4" in message and "task loss" in message
    assert "backbone.pointwise.weight" in message
    assert isinstance(caught.value, OrthoRegError) and "\n" not in message
    assert_intact_checkpoint(tmp_path, step=2)


def test_non_finite_penalty_names_step_and_matrix(tmp_path: Path):
    """An unused (for the loss) weight turned inf: the loss is fine, the penalty is not."""
    model = make_model()
    with pytest.raises(NonFiniteError) as caught:
        finetune(model, head(), data(), config(), tmp_path,
                 on_log=set_to_inf(model, "backbone.spare.weight", at_step=3))
    message = str(caught.value)
    assert "step 4" in message and "penalty" in message and "spare.weight" in message
    assert_intact_checkpoint(tmp_path, step=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_non_finite_gradient_names_step_and_parameter(tmp_path: Path, bad: float,
                                                      grad_clip: float | None):
    """A hook poisons fc.weight's gradient from step 5 on (checkpoint at 4).

    ``fc.weight`` is not the first parameter: naming the first one would be wrong (gradient
    clipping multiplies every gradient by the NaN norm, so the check must precede it).
    """
    model = make_model()
    calls = {"n": 0}

    def poison(grad: Tensor) -> Tensor:
        calls["n"] += 1
        return grad * bad if calls["n"] >= 5 else grad

    model.backbone.fc.weight.register_hook(poison)
    cfg = config(grad_clip=grad_clip, lam=0.0)
    with pytest.raises(NonFiniteError) as caught:
        finetune(model, head(), data(), cfg, tmp_path)
    message = str(caught.value)
    assert "step 5" in message and "'backbone.fc.weight'" in message and "gradient" in message
    assert_intact_checkpoint(tmp_path, step=4, cfg=cfg)


def test_a_non_finite_weight_is_never_checkpointed(tmp_path: Path):
    """A weight turned inf right before a checkpoint (step 4): the step-2 checkpoint is kept
    rather than overwritten with a poisoned one that could never resume."""
    model = make_model()
    with pytest.raises(NonFiniteError) as caught:
        finetune(model, head(), data(), config(), tmp_path,
                 on_log=set_to_inf(model, "backbone.conv.weight", at_step=4))
    assert "step 4" in str(caught.value) and "backbone.conv.weight" in str(caught.value)
    assert_intact_checkpoint(tmp_path, step=2)


def test_non_finite_inputs_are_reported_as_such(tmp_path: Path):
    """NaN images with finite weights: the loss error says the parameters are finite."""
    images = torch.randn(32, 3, 8, 8)
    images[5:] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 1\b.*task loss") as caught:
        finetune(make_model(), head(), TensorDataset(images, torch.zeros(32, dtype=torch.long)),
                 config(), tmp_path)
    assert "parameters are finite" in str(caught.value)
    assert not (tmp_path / CHECKPOINT).exists()
