"""The fine-tuning loop: penalty effect, determinism, NaN guard, resumption, accumulation."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orthoreg.paradigms import Full, Linear, Lora, Paradigm
from orthoreg.paradigms.base import FineTunable
from orthoreg.taskvector import TaskVector
from orthoreg.training import (
    NonFiniteError,
    TrainConfig,
    Trainer,
    TrainResult,
    batch_indices,
    finetune,
    learning_rate,
)
from orthoreg.utils.io import read_tensors

PARADIGMS: dict[str, Callable[[], Paradigm]] = {
    "full": Full,
    "linear": Linear,
    "lora": lambda: Lora(targets=["pointwise", "fc"], rank=2, alpha=8.0),
    # dropout > 0 makes the run consume the global RNG: seeding and resumption must cover it
    "lora_dropout": lambda: Lora(targets=["pointwise", "fc"], rank=2, alpha=2.0, dropout=0.5),
    "lora_attn": lambda: Lora(targets="vit_attention", rank=2, alpha=4.0),  # on AttnNet
}


def config(**overrides) -> TrainConfig:
    """A tiny run: 6 steps of batch 8, warm-up 2, checkpoint every 2, log every step."""
    base = dict(steps=6, batch_size=8, lr=1e-2, weight_decay=0.01, warmup_steps=2,
                checkpoint_every=2, log_every=1, progress=False)
    return TrainConfig(**{**base, **overrides})


def prepared(make_backbone: Callable[..., nn.Module], paradigm: str) -> FineTunable:
    """θ0 and adapter initialisation depend only on fixed seeds."""
    backbone = make_backbone(seed=0)
    torch.manual_seed(1)
    return PARADIGMS[paradigm]().prepare(backbone)


def train(model: FineTunable, head: nn.Module, data: TensorDataset, cfg: TrainConfig,
          workdir: Path | None = None, **kwargs) -> tuple[TaskVector, TrainResult]:
    result = finetune(model, head, data, cfg, workdir, **kwargs)
    return model.task_vector(), result


def assert_bit_equal(a: TaskVector, b: TaskVector) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- learning rate
def test_learning_rate_warmup_peak_and_cosine_to_zero():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=2.0)
    rates = [learning_rate(step, cfg) for step in range(cfg.steps + 1)]
    for step in range(10):  # linear warm-up, reaching lr on the last warm-up step
        assert rates[step] == pytest.approx(2.0 * (step + 1) / 10)
    assert max(rates) == pytest.approx(2.0) and rates[10] == pytest.approx(2.0)
    for step in range(10, 101):  # half-cosine from lr at the end of warm-up to 0 at the end
        assert rates[step] == pytest.approx(1.0 + math.cos(math.pi * (step - 10) / 90), abs=1e-12)
    assert all(a >= b for a, b in pairwise(rates[10:]))
    assert rates[100] == pytest.approx(0.0, abs=1e-15) and 0 < rates[99] < 1e-3
    assert learning_rate(0, TrainConfig(steps=5, warmup_steps=0, lr=1.0)) == 1.0


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    first = batch_indices(32, 8, 5, seed=3)
    assert torch.equal(first, batch_indices(32, 8, 5, seed=3))
    assert not torch.equal(first, batch_indices(32, 8, 5, seed=4))
    epoch = torch.cat([batch_indices(32, 8, step, seed=3) for step in range(4)])
    assert sorted(epoch.tolist()) == list(range(32))  # one epoch = a permutation, drop-last


# --------------------------------------------------------------------------- the penalty
@pytest.mark.parametrize("paradigm", ["full", "lora", "linear"])
def test_positive_lambda_ends_with_lower_penalty(conv_net, head, images, paradigm):
    """Same steps and seed: training with λ > 0 ends more orthogonal than with λ = 0."""
    penalties = {}
    for lam in (0.0, 1.0):
        model = prepared(conv_net, paradigm)
        train(model, head, images, config(steps=15, lam=lam))
        with torch.no_grad():
            penalties[lam] = float(model.regularizer()())
    assert penalties[1.0] < penalties[0.0] - 0.1, penalties


def test_history_logs_task_loss_and_penalty_separately(conv_net, head, images):
    model = prepared(conv_net, "full")
    _, result = train(model, head, images, config(lam=0.5, log_every=2))
    assert [record["step"] for record in result.history] == [2, 4, 6]
    for record in result.history:
        assert record["penalty"] > 0 and record["task_loss"] > 0
        assert record["loss"] == pytest.approx(record["task_loss"] + 0.5 * record["penalty"])
    with torch.no_grad():
        assert result.final["penalty"] == pytest.approx(float(model.regularizer()()), rel=0.2)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("paradigm", ["full", "lora_dropout"])
def test_same_seed_same_vector_different_seed_different_vector(conv_net, head, images, paradigm):
    """A run is a function of its config: the caller's global RNG state does not leak in."""
    first, _ = train(prepared(conv_net, paradigm), head, images, config(seed=0, lam=0.1))
    model = prepared(conv_net, paradigm)
    torch.rand(1000)  # the caller used the global generator in between
    second, _ = train(model, head, images, config(seed=0, lam=0.1))
    other, _ = train(prepared(conv_net, paradigm), head, images, config(seed=1, lam=0.1))
    assert_bit_equal(first, second)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# --------------------------------------------------------------------------- NaN guard
class NaNAfter(nn.Module):
    """A head that emits NaN logits from its ``after``-th call on (1-based)."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls >= self.after else out


def test_nan_loss_raises_naming_the_step_and_keeps_last_checkpoint(conv_net, head, images,
                                                                   tmp_path):
    """Step 5 (1-based, as logged) turns NaN: the step-4 checkpoint survives and resumes."""
    logged: list[int] = []
    with pytest.raises(NonFiniteError, match=r"step 5\b.*task loss"):
        finetune(prepared(conv_net, "full"), NaNAfter(head, after=5), images, config(),
                 tmp_path, on_log=lambda record: logged.append(int(record["step"])))
    assert logged == [1, 2, 3, 4]
    tensors, meta = read_tensors(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values()
                                     if t.is_floating_point())
    resumed = Trainer(prepared(conv_net, "full"), head, images, config(), tmp_path)
    assert resumed.try_resume() == 4


def test_nan_images_raise_before_any_checkpoint(conv_net, head, tmp_path):
    data = TensorDataset(torch.full((16, 3, 8, 8), float("nan")), torch.zeros(16, dtype=torch.long))
    with pytest.raises(NonFiniteError, match=r"step 1\b"):
        finetune(prepared(conv_net, "full"), head, data, config(), tmp_path)
    assert not (tmp_path / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------- resumption
class Interrupt(Exception):
    pass


def stop_at(step: int) -> Callable[[dict[str, float]], None]:
    def on_log(record: dict[str, float]) -> None:
        if record["step"] == step:
            raise Interrupt

    return on_log


@pytest.mark.parametrize("paradigm", ["full", "lora_dropout", "lora_attn"])
def test_interrupted_and_resumed_run_is_bit_identical(conv_net, attn_net, head, images, tmp_path,
                                                      paradigm):
    """Killed after step 5 (last checkpoint at 4) and resumed = never interrupted, bit for bit."""
    # lora_attn: PEFT's MHA adapters must not drift the frozen weights between forwards
    make = attn_net if paradigm == "lora_attn" else conv_net
    cfg = config(lam=0.3)
    expected, uninterrupted = train(prepared(make, paradigm), head, images, cfg,
                                    tmp_path / "straight")
    with pytest.raises(Interrupt):
        train(prepared(make, paradigm), head, images, cfg, tmp_path / "split",
              on_log=stop_at(5))
    resumed_vector, resumed = train(prepared(make, paradigm), head, images, cfg,
                                    tmp_path / "split")
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert_bit_equal(resumed_vector, expected)
    assert resumed.history == uninterrupted.history[4:]


def test_checkpoint_from_different_config_is_refused(conv_net, head, images, tmp_path):
    train(prepared(conv_net, "full"), head, images, config(steps=2), tmp_path)
    with pytest.raises(ValueError, match=r"different config \(first difference: lr\)"):
        train(prepared(conv_net, "full"), head, images, config(steps=2, lr=2e-2), tmp_path)
    # bookkeeping fields (logging, checkpoint cadence) may change between attempts
    train(prepared(conv_net, "full"), head, images, config(steps=2, log_every=2), tmp_path)


# --------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_one_large_batch(conv_net, head, images):
    """k micro-batches of b give the gradient of one batch of k·b, plus λ∇R counted once."""
    cfg = config(steps=1, batch_size=4, accumulation=3, lam=0.7, grad_clip=None)
    model = prepared(conv_net, "full")
    trainer = Trainer(model, head, images, cfg)
    captured: dict[str, Tensor] = {}

    def capture_instead_of_stepping(*args, **kwargs) -> None:
        captured.update({n: p.grad.clone() for n, p in trainer.params.items()})

    trainer.optimizer.step = capture_instead_of_stepping  # type: ignore[method-assign]
    trainer.run()

    reference = prepared(conv_net, "full").train()
    indices = torch.cat([batch_indices(len(images), 4, micro, cfg.seed) for micro in range(3)])
    x, y = images.tensors[0][indices], images.tensors[1][indices]
    loss = F.cross_entropy(head(reference(x)), y) + 0.7 * reference.regularizer()()
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert captured.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- forms and regime
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("paradigm", ["full", "lora"])
def test_regime_recorded_at_logging_steps_matches_svdvals(conv_net, head, images, paradigm, lam):
    """At every logged step (and the last), σ of every covered ΔW, baseline included."""
    model = prepared(conv_net, paradigm)
    _, result = train(model, head, images, config(steps=7, log_every=3, lam=lam))
    assert [entry["step"] for entry in result.regime] == [3, 6, 7]
    assert [entry["step"] for entry in result.regime] == [r["step"] for r in result.history]
    covered = model.regularizer()
    names = covered.names or [term.name for term in covered.lowrank]
    last = result.regime[-1]["matrices"]
    assert list(last) == names
    assert last != result.regime[0]["matrices"]  # ΔW moved between the readings
    for name, delta in zip(names, (d for d in model.deltas().values() if d.ndim >= 2)):
        sigma = torch.linalg.svdvals(delta.detach().reshape(delta.shape[0], -1).double())
        entry = last[name]
        assert set(entry) == {"sigma_max", "sigma_median", "r_over_sqrt_n", "fro", "n"}
        assert entry["n"] == sigma.numel()
        assert entry["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-4)
        assert entry["fro"] == pytest.approx(float(sigma.norm()), rel=1e-4)
        if paradigm == "full":
            assert entry["sigma_median"] == pytest.approx(float(sigma.quantile(0.5)), rel=1e-3)
        else:  # LoRA rank 2: the median of the two nonzero singular values
            assert entry["sigma_median"] == pytest.approx(float(sigma[:2].mean()), rel=1e-4)
        residual = ((sigma**2 - 1) ** 2).sum().sqrt() / math.sqrt(sigma.numel())
        assert entry["r_over_sqrt_n"] == pytest.approx(float(residual), rel=1e-5)


def test_regime_tracking_can_be_switched_off_and_changes_nothing(conv_net, head, images):
    tracked_vector, tracked = train(prepared(conv_net, "full"), head, images, config(lam=0.5))
    plain_vector, plain = train(prepared(conv_net, "full"), head, images,
                                config(lam=0.5, track_regime=False))
    assert plain.regime == [] and len(tracked.regime) == len(tracked.history)
    assert_bit_equal(tracked_vector, plain_vector)  # a pure measurement
    assert tracked.history == plain.history


@pytest.mark.parametrize("form", ["shape", "growth"])
def test_form_and_matrices_reach_the_penalty(conv_net, head, images, form):
    model = prepared(conv_net, "full")
    trainer = Trainer(model, head, images, config(lam=0.5, form=form, matrices="2d"))
    assert trainer.reg is not None and trainer.reg.form == form
    assert trainer.reg.names == ["fc.weight"]
    result = trainer.run()
    assert list(result.regime[-1]["matrices"]) == ["fc.weight"]
    with torch.no_grad():
        expected = float(model.regularizer(form=form, matrices="2d")())
    assert result.final["penalty"] == pytest.approx(expected, rel=0.2, abs=1e-3)


def test_resume_key_names_form_and_matrices_only_when_not_default():
    """Keys of runs (and cached stages) made before the forms existed stay the same."""
    default = TrainConfig().resume_key()
    assert "form" not in default and "matrices" not in default
    assert "track_regime" not in default and "track_regime" not in \
        TrainConfig(track_regime=False).resume_key()
    assert TrainConfig(form="shape").resume_key()["form"] == "shape"
    assert TrainConfig(matrices="2d").resume_key()["matrices"] == "2d"
    assert TrainConfig(form="growth").resume_key() != default


@pytest.mark.parametrize("field,value,message", [
    ("lam", float("nan"), "invalid lam"), ("lam", float("inf"), "invalid lam"),
    ("lam", -0.1, "invalid lam"),
    ("form", "spectral", r"invalid form = 'spectral' \(choose from \['growth', 'paper', 'shape'\]\)"),
    ("matrices", "3d", r"invalid matrices = '3d' \(choose from \['2d', 'ndim>=2'\]\)"),
])
def test_train_config_rejects_bad_penalty_options(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_checkpoint_of_another_form_is_refused(conv_net, head, images, tmp_path):
    train(prepared(conv_net, "full"), head, images, config(steps=2, lam=0.5), tmp_path)
    with pytest.raises(ValueError, match=r"different config \(first difference: form\)"):
        train(prepared(conv_net, "full"), head, images,
              config(steps=2, lam=0.5, form="shape"), tmp_path)
