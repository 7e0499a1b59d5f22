"""OrthoReg in a ``transformers.Trainer``: the penalty as part of the training loss.

:class:`OrthoRegTrainer` (or :func:`add_orthoreg` on an existing ``Trainer``) minimises
``L_task + λ·Σ_l R(ΔW_l)`` (Liu et al. 2026, the OrthoReg objective; ``R = ‖G − I‖_F``, or
its square with ``orthoreg_squared=True``). PEFT LoRA models get the exact low-rank form of
R computed from r×r matrices (see :func:`orthoreg.regularizer.lowrank_penalty`).

Which Trainer hook, and why. transformers 5.x offers three places for a custom objective:

- ``compute_loss_func=`` (a Trainer argument) receives only ``(outputs, labels,
  num_items_in_batch)``. It is meant to *replace the task loss*, and the Trainer treats its
  result as already normalised over the whole accumulated batch. A weight penalty is not a
  per-token quantity: routing it through that function would either hide the model from it
  or scale it by the token count.
- A ``TrainerCallback`` can only watch; it sees no loss, and the hook that could touch
  gradients (``on_pre_optimizer_step``) runs *after* gradient clipping and, under fp16,
  before the grad-scaler's unscale — so a penalty gradient added there is clipped wrongly
  or scaled wrongly.
- Overriding ``Trainer.compute_loss`` in a subclass is what the transformers docs recommend
  for changing *what* is optimised ("Subclassing Trainer methods": callbacks control when
  things happen, subclassing changes the loss). The penalty then goes through the Trainer's
  own single backward pass, so clipping, mixed precision, DDP gradient averaging and
  logging all see it as part of the loss.

So the mixin overrides ``compute_loss``. Under gradient accumulation R is computed **once
per optimizer step**: the weights do not change between micro-batches, so the penalty is
added only on the last micro-batch of each accumulation window (where the Trainer
syncs gradients), multiplied by the factor the Trainer will divide that micro-batch's loss
by. The resulting gradient is exactly ``∇L_task + λ∇R``, as without accumulation. The
first such step checks that the Trainer divided the loss as predicted and stops with an
error otherwise, so a future change of transformers' scaling cannot silently rescale λ.

Logged next to ``loss`` (which is the total objective): ``orthoreg_penalty`` (mean R over
the optimizer steps since the last log, without λ) and ``task_loss`` (``loss − λ·R``, so it
inherits the float32 rounding of the Trainer's running ``loss``).

θ0 is captured when the trainer is built (or when ``model_init`` builds a model), before
``train(resume_from_checkpoint=...)`` loads a checkpoint, so resuming keeps the pretrained
reference. If the model you hand the trainer is *not* θ0, pass ``orthoreg_reference=``.
Sharded parameters (FSDP, DeepSpeed ZeRO-3) are not supported: R needs whole matrices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "orthoreg.integrations.hf needs transformers and accelerate: "
        "pip install 'orthoreg[hf]'"
    ) from exc

from orthoreg.regularizer import OrthoReg, lora_terms, penalty_form, select_parameters


def capture_reference(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """θ0 of exactly the dense matrices OrthoReg will cover (LoRA factors need none).

    A detached copy on the parameters' own device: the Trainer may later load a checkpoint
    into the same parameter objects, and the reference must not follow them.
    """
    lowrank = lora_terms(model)
    lora_ids = {id(t.A) for t in lowrank} | {id(t.B) for t in lowrank}
    lora_names = {name for name, p in model.named_parameters() if id(p) in lora_ids}
    chosen = select_parameters(model, include, exclude, skip=lora_names)
    return {name: param.detach().clone() for name, param in chosen}


def _autocast_off(device: torch.device) -> Any:
    """The penalty's Gram must not run in bf16/fp16: G − I is small next to I."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        import contextlib

        return contextlib.nullcontext()


class OrthoRegMixin:
    """Adds ``λ·Σ_l R(ΔW_l)`` to a ``transformers.Trainer``'s training loss.

    Mix in *before* the Trainer class (``class T(OrthoRegMixin, Trainer)``) or use
    :func:`add_orthoreg`. With ``orthoreg_lambda=0`` the penalty is still computed (without
    gradient) and logged, which makes an unregularised baseline directly comparable.
    """

    orthoreg_lambda: float
    orthoreg_squared: bool
    orthoreg_form: str

    def _init_orthoreg(
        self,
        lam: float,
        squared: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        reference: Mapping[str, Tensor] | None = None,
        form: str = "paper",
    ) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"orthoreg_lambda must be a finite number ≥ 0, got {lam!r}")
        penalty_form(form)  # an unknown form fails now, listing the known ones
        trainer: Any = self
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(
            trainer, "is_deepspeed_enabled", False
        ):
            raise NotImplementedError(
                "OrthoReg needs whole weight matrices; FSDP / DeepSpeed sharding is not supported"
            )
        self.orthoreg_lambda = float(lam)
        self.orthoreg_squared = bool(squared)
        self.orthoreg_form = form
        self._orthoreg_include = include
        self._orthoreg_exclude = exclude
        self._orthoreg: OrthoReg | None = None
        self._orthoreg_reference: Mapping[str, Tensor] | None = (
            reference if reference is not None
            else capture_reference(trainer.model, include, exclude)
        )
        if not self._orthoreg_reference and not lora_terms(trainer.model):
            # fail now, not at the first training step
            raise ValueError(
                "OrthoReg covers nothing: no trainable ≥2-D weight matches "
                f"include={include!r} exclude={exclude!r} and the model has no LoRA adapter"
            )
        self._orthoreg_sum: Tensor | None = None
        self._orthoreg_count = 0
        self._orthoreg_pending: tuple[Tensor, float] | None = None
        self._orthoreg_checked = False

    # ------------------------------------------------------------------ the penalty
    @property
    def orthoreg(self) -> OrthoReg:
        """The penalty object, built on first use so θ0 moves with the model's device."""
        if self._orthoreg is None:
            model = self.model  # type: ignore[attr-defined]
            self._orthoreg = OrthoReg(
                model,
                reference=self._orthoreg_reference,
                include=self._orthoreg_include,
                exclude=self._orthoreg_exclude,
                squared=self.orthoreg_squared,
                form=self.orthoreg_form,
            )
            self._orthoreg_reference = None  # OrthoReg keeps (copies or borrows) what it needs
        return self._orthoreg

    def orthoreg_penalty(self) -> Tensor:
        """Σ_l R(ΔW_l) now, without λ (differentiable)."""
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        with _autocast_off(device):
            return self.orthoreg()

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """A freshly initialised model has a new θ0: capture it before any checkpoint load."""
        model = super().call_model_init(trial)  # type: ignore[misc]
        if hasattr(self, "orthoreg_lambda"):
            self._orthoreg = None
            self._orthoreg_reference = capture_reference(
                model, self._orthoreg_include, self._orthoreg_exclude
            )
        return model

    # ------------------------------------------------------------------ Trainer hooks
    def _ga_divisor(self, num_items_in_batch: Any) -> float:
        """What ``Trainer.training_step`` will divide this micro-batch's loss by."""
        trainer: Any = self
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                getattr(trainer, "model_accepts_loss_kwargs", False)
                and num_items_in_batch is not None
            ) or getattr(trainer, "compute_loss_func", None) is not None
        if scaled:
            return 1.0
        steps = getattr(trainer, "current_gradient_accumulation_steps", None)
        return float(steps if steps is not None else trainer.args.gradient_accumulation_steps)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The task loss, plus λ·R on the last micro-batch of each accumulation window."""
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        trainer: Any = self
        if not (model.training and torch.is_grad_enabled()):
            return result  # evaluation: report the task loss only
        if not trainer.accelerator.sync_gradients:
            return result  # not the micro-batch that carries this step's penalty
        loss, outputs = result if return_outputs else (result, None)
        if self.orthoreg_lambda > 0:
            penalty = self.orthoreg_penalty()
            divisor = self._ga_divisor(num_items_in_batch)
            loss = loss + (self.orthoreg_lambda * divisor) * penalty.to(loss.device)
            if not self._orthoreg_checked:
                self._orthoreg_pending = (loss.detach().float().mean(), divisor)
        else:
            with torch.no_grad():
                penalty = self.orthoreg_penalty()
        value = penalty.detach().float()
        self._orthoreg_sum = value if self._orthoreg_sum is None else self._orthoreg_sum + value
        self._orthoreg_count += 1
        return (loss, outputs) if return_outputs else loss

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """Once: check that the Trainer scaled the loss for accumulation as predicted."""
        self._orthoreg_pending = None
        step_loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        pending = self._orthoreg_pending
        if pending is not None and not self._orthoreg_checked:
            total, divisor = pending
            seen = step_loss.detach().float().mean().to(total.device)
            if torch.isfinite(seen) and torch.isfinite(total):
                expected = total / divisor
                if not torch.allclose(seen, expected, rtol=1e-4, atol=1e-6):
                    raise RuntimeError(
                        "OrthoReg: this transformers version scaled the loss for gradient "
                        f"accumulation differently than predicted (got {float(seen):.6g}, "
                        f"expected {float(expected):.6g}); the penalty weight would be wrong"
                    )
                self._orthoreg_checked = True
        return step_loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``orthoreg_penalty`` and ``task_loss`` to every training-loss log entry."""
        if "loss" in logs and self._orthoreg_count:
            assert self._orthoreg_sum is not None
            mean_penalty = float(self._orthoreg_sum) / self._orthoreg_count
            logs = {**logs, "orthoreg_penalty": mean_penalty}
            logs["task_loss"] = logs["loss"] - self.orthoreg_lambda * mean_penalty
            self._orthoreg_sum, self._orthoreg_count = None, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class OrthoRegTrainer(OrthoRegMixin, Trainer):
    """``transformers.Trainer`` whose objective is ``L_task + λ·Σ_l R(ΔW_l)``.

    Every ``Trainer`` argument works as usual; the OrthoReg options are keyword-only:

    - ``orthoreg_lambda`` — λ (the paper's README uses 10 for full FT, 1 for LoRA, with the
      plain norm); 0 trains without the penalty but still logs it.
    - ``orthoreg_squared`` — the paper's squared ‖G − I‖²_F instead of the code's ‖G − I‖_F;
      λ does not transfer between the two.
    - ``orthoreg_form`` — the penalty form: ``"paper"`` (default), or the controls
      ``"shape"`` (‖G/ḡ − I‖_F, spectrum shape only) and ``"growth"`` (magnitude only);
      see :data:`orthoreg.regularizer.PENALTY_FORMS`. Each form needs its own λ.
    - ``orthoreg_include`` / ``orthoreg_exclude`` — parameter-name globs choosing the dense
      matrices covered (default: every trainable ≥2-D non-normalisation weight); PEFT LoRA
      adapters are always covered, in low-rank form. A freshly initialised classification
      head is "trained" too; exclude it (e.g. ``["classifier.*"]``) to regularise the
      encoder only. A trainable token-embedding table is covered like any matrix (its Gram
      is hidden×hidden, but forming it reads the whole table every step); exclude
      ``["*embeddings*"]`` if that cost matters more than the paper's "every trained matrix".
    - ``orthoreg_reference`` — θ0 by parameter name, when the model given is not θ0.
    """

    def __init__(
        self,
        *args: Any,
        orthoreg_lambda: float = 1.0,
        orthoreg_squared: bool = False,
        orthoreg_include: Sequence[str] | None = None,
        orthoreg_exclude: Sequence[str] | None = None,
        orthoreg_reference: Mapping[str, Tensor] | None = None,
        orthoreg_form: str = "paper",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_orthoreg(
            orthoreg_lambda, orthoreg_squared, orthoreg_include, orthoreg_exclude,
            orthoreg_reference, orthoreg_form,
        )


@functools.cache
def _with_orthoreg(trainer_class: type) -> type:
    return type(f"OrthoReg{trainer_class.__name__}", (OrthoRegMixin, trainer_class), {})


def add_orthoreg(
    trainer: Trainer,
    lam: float,
    *,
    squared: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reference: Mapping[str, Tensor] | None = None,
    form: str = "paper",
) -> Trainer:
    """Give an existing Trainer (of any Trainer subclass) the OrthoReg term; returns it.

    The instance's class is swapped for a cached subclass with :class:`OrthoRegMixin` in
    front, so subclasses such as TRL's trainers keep their own ``compute_loss`` (the mixin
    calls it and adds the penalty). θ0 is captured now: call this before ``train()``.
    """
    if isinstance(trainer, OrthoRegMixin):
        raise ValueError("this trainer already has OrthoReg; set trainer.orthoreg_lambda instead")
    trainer.__class__ = _with_orthoreg(type(trainer))
    trainer._init_orthoreg(lam, squared, include, exclude, reference, form)  # type: ignore[attr-defined]
    return trainer
