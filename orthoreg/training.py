"""The fine-tuning loop: small enough to hold in one's head, safe to kill at any step.

Objective (Liu et al. 2026, OrthoReg): ``L = L_task + λ·Σ_l R(ΔW_l)``. Under gradient
accumulation the penalty is evaluated once per optimizer step, not per micro-batch: its
gradient is identical (Σ_k λR/k = λR) and it costs 1/k as much.

Resumability: the data order of every step is a pure function of (seed, step), the learning
rate is a pure function of step, and the checkpoint holds trainable tensors, optimizer
state and RNG states. A run killed at any point and restarted ends bit-identical (CPU) to
an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from orthoreg.errors import OrthoRegError
from orthoreg.paradigms.base import FineTunable
from orthoreg.regularizer import ESTIMATORS, MATRIX_RULES, PENALTY_FORMS, OrthoReg
from orthoreg.utils.io import OrthoRegFileError, read_tensors, save_tensors
from orthoreg.utils.provenance import provenance

CHECKPOINT = "checkpoint.safetensors"


class NonFiniteError(OrthoRegError, FloatingPointError):
    """Loss, penalty or gradient became NaN/inf; the last checkpoint is left untouched."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (defaults: the paper's CLIP recipe, scaled)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    accumulation: int = 1
    label_smoothing: float = 0.0
    lam: float = 0.0
    squared: bool = False
    estimator: str = "exact"
    probes: int = 8
    form: str = "paper"  # the penalty form (orthoreg.regularizer.PENALTY_FORMS)
    matrices: str = "ndim>=2"  # which weights it covers (orthoreg.regularizer.MATRIX_RULES)
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    amp: bool = False  # bf16 autocast on CUDA
    #: record ΔW's regime (σ_max, median σ, R/√n, ‖ΔW‖_F per matrix) at every logged step
    track_regime: bool = True

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "warmup_steps": self.warmup_steps >= 0,
            "accumulation": self.accumulation >= 1,
            "lam": math.isfinite(self.lam) and self.lam >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1, "probes": self.probes >= 1,
            "checkpoint_every": self.checkpoint_every >= 1, "log_every": self.log_every >= 1,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "form": self.form in PENALTY_FORMS, "matrices": self.matrices in MATRIX_RULES,
            "estimator": self.estimator in ESTIMATORS,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig: invalid {bad[0]} = {getattr(self, bad[0])!r}"
                             + _CHOICES.get(bad[0], ""))
        if self.form not in ESTIMATORS[self.estimator].forms:
            raise ValueError(f"TrainConfig: estimator={self.estimator!r} does not support "
                             f"form={self.form!r}")

    def resume_key(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed.

        ``form`` and ``matrices`` appear only when not their defaults, so that the keys of
        runs (and cached experiment stages) made before they existed stay the same.
        """
        skip = {"progress", "log_every", "checkpoint_every", "track_regime"}
        defaults = {"form": "paper", "matrices": "ndim>=2"}
        return {k: v for k, v in asdict(self).items()
                if k not in skip and not (k in defaults and v == defaults[k])}


_CHOICES = {
    "form": f" (choose from {sorted(PENALTY_FORMS)})",
    "matrices": f" (choose from {sorted(MATRIX_RULES)})",
    "estimator": f" (choose from {sorted(ESTIMATORS)})",
    "lam": " (λ must be a finite number ≥ 0)",
}


@dataclass
class TrainResult:
    """What a run did: its logged metrics and, with ``track_regime``, ΔW's regime.

    ``regime``: one entry per logged step (the steps of ``history``), ``{"step": int,
    "matrices": {name: {"sigma_max", "sigma_median", "r_over_sqrt_n", "fro", "n"}}}`` for
    every matrix the penalty covers (:meth:`orthoreg.regularizer.OrthoReg.regime`); recorded
    for baselines (λ = 0) too, over the matrices the penalty would cover.
    """

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    regime: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to zero (a pure function of the step)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int, rank: int = 0,
                  world: int = 1) -> Tensor:
    """Indices of micro-batch ``micro_step``: epochs are seeded permutations, drop-last.

    Deterministic in (seed, micro_step) so that a resumed run sees the same data. With
    ``world`` > 1 each rank takes its slice of the global batch.
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} examples is smaller than one batch of {batch_size}")
    epoch, position = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    batch = order[position * batch_size : (position + 1) * batch_size]
    return batch.tensor_split(world)[rank] if world > 1 else batch


def _stack(dataset: Dataset, indices: Tensor) -> tuple[Tensor, Tensor]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # TensorDataset: one gather, no Python loop
        return tensors[0][indices], tensors[1][indices]
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _first_nonfinite(named: dict[str, Tensor]) -> str | None:
    for name, value in named.items():
        if value is not None and not torch.isfinite(value).all():
            return name
    return None


class Trainer:
    """One fine-tuning run of a :class:`FineTunable` with a frozen head."""

    def __init__(self, model: FineTunable, head: nn.Module, train: Dataset, config: TrainConfig,
                 workdir: str | os.PathLike[str] | None = None,
                 on_log: Callable[[dict[str, float]], None] | None = None) -> None:
        self.model, self.head, self.train_data, self.config = model, head, train, config
        self.workdir = Path(workdir) if workdir is not None else None
        self.on_log = on_log
        head.requires_grad_(False)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("nothing to train: the model has no trainable parameter")
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.reg = (model.regularizer(squared=config.squared, estimator=config.estimator,
                                      probes=config.probes, form=config.form,
                                      matrices=config.matrices)
                    if config.lam > 0 else None)
        # what the regime is read from when there is no penalty (λ = 0): built on first use
        self._regime_reader: OrthoReg | None = None
        self.step = 0
        self.rank, self.world = _dist_rank_world()

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Train from ``workdir``'s checkpoint, if any, up to ``config.steps`` steps.

        The loop is bookkeeping only: :meth:`_step` does one optimizer step; here its metrics
        are logged and shown, and the weights checkpointed.
        """
        cfg = self.config
        start_step = self.try_resume()
        if start_step == 0:
            # dropout masks and Hutchinson probes draw from the global generator: seed it
            # from the config so a run does not depend on what the caller drew before (a
            # resumed run restores the checkpointed generator state instead)
            torch.manual_seed(cfg.seed)
        device = next(iter(self.params.values())).device
        self.model.train()
        self.head.eval()
        history: list[dict[str, float]] = []
        regime: list[dict[str, Any]] = []
        started = time.perf_counter()
        bar = _progress(cfg, start_step, enabled=cfg.progress and self.rank == 0)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            cfg.amp and device.type == "cuda") else nullcontext()
        while self.step < cfg.steps:
            record = self._step(device, autocast)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                history.append(record)
                reading = self.regime()
                if reading is not None:
                    regime.append({"step": self.step, "matrices": reading})
                if self.on_log:
                    self.on_log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['task_loss']:.3f}", pen=f"{record['penalty']:.3g}",
                                acc=f"{record['acc']:.2f}", refresh=False)
            if self.workdir is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self._checkpoint()
        if bar is not None:
            bar.close()
        return TrainResult(self.step, time.perf_counter() - started, history, start_step,
                           regime)

    def regime(self) -> dict[str, dict[str, float | int]] | None:
        """ΔW's regime now, per covered matrix (``None`` with ``track_regime`` off).

        Read from the penalty, or, for a baseline (λ = 0), from a penalty object built once
        for the purpose (θ0 borrowed from the paradigm, never copied; its ΔW workspace is
        allocated on the first reading). A model the penalty could not cover reads as ``{}``.
        """
        if not self.config.track_regime:
            return None
        # the penalty itself when it is an OrthoReg (a wrapper around one, as tests and
        # benchmarks install, gets a reader of its own)
        reader = self.reg if isinstance(self.reg, OrthoReg) else self._regime_reader
        if reader is None:
            cfg = self.config
            try:
                reader = self.model.regularizer(squared=cfg.squared, form=cfg.form,
                                                matrices=cfg.matrices)
            except ValueError:  # nothing to cover (e.g. only biases train)
                return {}
            self._regime_reader = reader
        return reader.regime()

    # ---------------------------------------------------------------- one step
    def _step(self, device: torch.device,
              autocast: AbstractContextManager[Any]) -> dict[str, float]:
        """One optimizer step of ``L_task + λ·R``; returns its metrics, ``self.step`` advanced.

        A non-finite loss, penalty or gradient raises :class:`NonFiniteError` before the
        optimizer touches the weights, so they stay those of the last completed step.
        """
        cfg = self.config
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        task_loss, correct, seen = self._task_backward(device, autocast)
        penalty = self._penalty_backward()
        norm = self._clip_gradients()
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "lr": lr, "task_loss": task_loss, "penalty": penalty,
                "loss": task_loss + cfg.lam * penalty, "acc": correct / max(1, seen),
                "grad_norm": float(norm)}

    def _task_backward(self, device: torch.device,
                       autocast: AbstractContextManager[Any]) -> tuple[float, int, int]:
        """Forward and backward the task loss of every micro-batch of the step (every rank's).

        Returns the step's task loss (averaged over its micro-batches), and how many examples
        the model classified right out of how many it saw.
        """
        cfg = self.config
        task_total, correct, seen = 0.0, 0, 0
        for micro in range(cfg.accumulation):
            x, y = self._micro_batch(self.step * cfg.accumulation + micro, device)
            with autocast:
                logits = self.head(self.model(x))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if self.world == 1:
                self._check_finite("task loss", loss.detach())
                (loss / cfg.accumulation).backward()
                task_total += float(loss.detach()) / cfg.accumulation
            else:
                # this rank's share of the global-batch mean (its slice may be one example
                # shorter): summed over ranks, the gradient is one process's on the batch
                share = len(y) / (cfg.batch_size * cfg.accumulation)
                (loss * share).backward()
                task_total += float(loss.detach()) * share
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        if self.world > 1:
            # the task gradients are summed across ranks before the penalty, which every
            # rank computes identically from identical weights and adds once
            task_total, correct, seen = _all_reduce_step(self.params, task_total, correct,
                                                         seen, device)
            self._check_finite("task loss", torch.tensor(task_total))
        return task_total, correct, seen

    def _penalty_backward(self) -> float:
        """Add λ·∇R to the gradients, once per optimizer step; returns R (0 without OrthoReg)."""
        if self.reg is None:
            return 0.0
        # value and λ·∇R straight into .grad (one pass over ΔW); a non-finite value stops
        # the step here, before the optimizer touches anything
        penalty = self.reg.accumulate_grad(self.config.lam)
        self._check_finite("penalty", penalty)
        return float(penalty)

    def _clip_gradients(self) -> Tensor:
        """The gradients' total norm, checked finite, then clipped to ``grad_clip`` by it."""
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        # the norm first, then the check, then the clip (= clip_grad_norm_): clipping by
        # a NaN norm would turn every gradient NaN and hide which one was the first
        norm = nn.utils.get_total_norm(list(grads.values()))
        if not torch.isfinite(norm):
            raise NonFiniteError(f"step {self.step + 1}: gradient of "
                                 f"{_first_nonfinite(grads)!r} is not finite; "
                                 "the last checkpoint is intact")
        if self.config.grad_clip:
            nn.utils.clip_grads_with_norm_(list(self.params.values()), self.config.grad_clip,
                                           norm)
        return norm

    def _micro_batch(self, micro_step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This rank's share of micro-batch ``micro_step``, a pure function of (seed, step)."""
        indices = batch_indices(len(self.train_data), self.config.batch_size, micro_step,
                                self.config.seed, self.rank, self.world)
        x, y = _stack(self.train_data, indices)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _check_finite(self, what: str, value: Tensor) -> None:
        """Raise :class:`NonFiniteError` naming the first culprit when ``value`` is not finite."""
        if not torch.isfinite(value).all():
            if what == "penalty" and self.reg is not None:
                layer = _first_nonfinite(self.reg.per_layer())
                detail = f" (first offending matrix: {layer})"
            else:
                param = _first_nonfinite({n: p.detach() for n, p in self.params.items()})
                detail = (f" (first non-finite parameter: {param})" if param is not None else
                          " (all parameters are finite: check the input batch)")
            # 1-based like the history's "step" (self.step steps have completed)
            raise NonFiniteError(f"step {self.step + 1}: {what} is {float(value)}{detail}; "
                                 "the last checkpoint is intact")

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> Path | None:
        return self.workdir / CHECKPOINT if self.workdir is not None else None

    def save_checkpoint(self) -> None:
        """Write weights, optimizer state and RNG state atomically (rank 0 alone)."""
        path = self.checkpoint_path()
        if path is None or self.rank != 0:
            return
        tensors = {f"model.{n}": p.detach() for n, p in self.params.items()}
        names = list(self.params)
        state = self.optimizer.state_dict()
        for index, slot in state["state"].items():
            for key, value in slot.items():
                tensors[f"optim.{names[index]}.{key}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"kind": "orthoreg.checkpoint", "step": self.step,
                "config": self.config.resume_key(), **provenance(self.config.seed)}
        save_tensors(path, tensors, meta)

    def _checkpoint(self) -> None:
        """Save a checkpoint, unless a weight is not finite.

        A good checkpoint is never replaced by one that could not resume; the full scan of
        the weights this takes is paid only where a checkpoint is written.
        """
        poisoned = _first_nonfinite({n: p.detach() for n, p in self.params.items()})
        if poisoned is not None:
            raise NonFiniteError(f"step {self.step}: parameter {poisoned!r} is not "
                                 "finite; the last checkpoint is intact")
        self.save_checkpoint()

    def try_resume(self) -> int:
        """Restore the checkpoint in ``workdir`` if there is one; returns its step (0: none).

        A checkpoint written with another config, or one that is damaged, raises
        :class:`OrthoRegFileError` rather than silently training something else.
        """
        path = self.checkpoint_path()
        if path is None:
            return 0
        # a run killed inside an atomic write leaves its temporary file behind: this trainer
        # owns the directory, so sweep them (they are as large as a checkpoint); rank 0
        # alone writes checkpoints, so it alone sweeps
        if self.rank == 0:
            for orphan in path.parent.glob(f".{path.name}.*.tmp"):
                orphan.unlink(missing_ok=True)
        if not path.exists():
            return 0
        tensors, meta = read_tensors(path, device="cpu")
        if meta.get("kind") != "orthoreg.checkpoint":
            raise OrthoRegFileError(f"{path}: not an orthoreg training checkpoint")
        if meta.get("config") != self.config.resume_key():
            recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {}
            diff = [k for k, v in self.config.resume_key().items() if recorded.get(k) != v]
            raise OrthoRegFileError(f"{path}: checkpoint was written with a different config "
                                    f"(first difference: {diff[0] if diff else '?'}); use "
                                    "another output directory or delete the checkpoint")
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 < step <= self.config.steps:
            raise OrthoRegFileError(f"{path}: checkpoint records an invalid step {step!r}")
        rng = tensors.get("rng.torch")
        reference_rng = torch.get_rng_state()
        if rng is None or rng.dtype != reference_rng.dtype or rng.shape != reference_rng.shape:
            raise OrthoRegFileError(f"{path}: checkpoint lacks a valid RNG state")
        with torch.no_grad():
            for name, param in self.params.items():
                key = f"model.{name}"
                if key not in tensors or tensors[key].shape != param.shape:
                    raise OrthoRegFileError(f"{path}: checkpoint lacks or misshapes {name!r}")
                param.copy_(tensors[key])
        names = list(self.params)
        state = self.optimizer.state_dict()
        for index, name in enumerate(names):
            slot = {k.split(".")[-1]: v for k, v in tensors.items()
                    if k.startswith(f"optim.{name}.") and k.count(".") == name.count(".") + 2}
            for key, value in slot.items():
                expected = () if key == "step" else self.params[name].shape
                if value.shape != expected:
                    raise OrthoRegFileError(f"{path}: optimizer state {key!r} of {name!r} has "
                                            f"shape {tuple(value.shape)}, expected "
                                            f"{tuple(expected)}")
            if slot:
                state["state"][index] = {k: v.to(self.params[name].device) if k != "step" else v
                                         for k, v in slot.items()}
        self.optimizer.load_state_dict(state)
        torch.set_rng_state(rng)
        self.step = step
        return self.step


def finetune(model: FineTunable, head: nn.Module, train: Dataset, config: TrainConfig,
             workdir: str | os.PathLike[str] | None = None, **kwargs: Any) -> TrainResult:
    """Fine-tune ``model`` (in place) with the frozen ``head``; resumes from ``workdir``."""
    return Trainer(model, head, train, config, workdir, **kwargs).run()


def _all_reduce_step(params: dict[str, nn.Parameter], task_total: float, correct: int,
                     seen: int, device: torch.device,
                     bucket_bytes: int = 64 << 20) -> tuple[float, int, int]:
    """Sum gradients and step statistics over ranks (DistributedDataParallel's reduction).

    Done by hand rather than by wrapping the model in DDP because the paradigms' forward
    passes (``torch.func`` JVPs, PEFT's functional attention) and the penalty's separate
    backward do not fit DDP's one-forward-one-backward hooks. Gradients are flattened into
    buckets (one collective per ``bucket_bytes``) per dtype/device. Which parameters have a
    gradient is a property of the model, hence the same on every rank.
    """
    dist = torch.distributed
    buckets: dict[tuple[torch.dtype, torch.device], list[tuple[int, list[Tensor]]]] = {}
    for grad in (p.grad for p in params.values() if p.grad is not None):
        chain = buckets.setdefault((grad.dtype, grad.device), [(0, [])])
        filled, members = chain[-1]
        if members and filled > bucket_bytes:
            chain.append((0, []))
            filled, members = chain[-1]
        members.append(grad)
        chain[-1] = (filled + grad.numel() * grad.element_size(), members)
    for chain in buckets.values():
        for _, bucket in chain:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
    stats = torch.tensor([task_total, float(correct), float(seen)], dtype=torch.float64,
                         device=device)
    dist.all_reduce(stats)
    return float(stats[0]), int(stats[1]), int(stats[2])


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _progress(config: TrainConfig, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="fine-tune", leave=False,
                dynamic_ncols=True)
