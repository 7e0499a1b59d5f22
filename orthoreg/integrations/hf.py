"""OrthoReg as a drop-in for the Hugging Face stack: Trainer, PEFT adapters, export.

Training
--------
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

Task vectors and export
-----------------------
:func:`task_vector_from_pretrained` and :func:`task_vector_from_peft` name every tensor by
the *base model's* parameter name, so full and LoRA vectors merge alike;
:func:`save_merged` writes θ0 + α·Σ τ as a safetensors checkpoint with a model card.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
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

from orthoreg.regularizer import OrthoReg, lora_terms, select_parameters
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.io import atomic_write_json, atomic_write_text
from orthoreg.utils.provenance import fingerprint_state, versions

__all__ = [
    "OrthoRegMixin",
    "OrthoRegTrainer",
    "add_orthoreg",
    "load_state",
    "merged_copy",
    "save_merged",
    "task_vector_from_peft",
    "task_vector_from_pretrained",
]

#: the prefix PeftModel puts in front of the wrapped model's module names
PEFT_PREFIX = "base_model.model."

StateSource = nn.Module | str | os.PathLike[str] | Mapping[str, Tensor]


# ============================================================================ training
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

    def _init_orthoreg(
        self,
        lam: float,
        squared: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        reference: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"orthoreg_lambda must be a finite number ≥ 0, got {lam!r}")
        trainer: Any = self
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(
            trainer, "is_deepspeed_enabled", False
        ):
            raise NotImplementedError(
                "OrthoReg needs whole weight matrices; FSDP / DeepSpeed sharding is not supported"
            )
        self.orthoreg_lambda = float(lam)
        self.orthoreg_squared = bool(squared)
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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_orthoreg(
            orthoreg_lambda, orthoreg_squared, orthoreg_include, orthoreg_exclude,
            orthoreg_reference,
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
) -> Trainer:
    """Give an existing Trainer (of any Trainer subclass) the OrthoReg term; returns it.

    The instance's class is swapped for a cached subclass with :class:`OrthoRegMixin` in
    front, so subclasses such as TRL's trainers keep their own ``compute_loss`` (the mixin
    calls it and adds the penalty). θ0 is captured now: call this before ``train()``.
    """
    if isinstance(trainer, OrthoRegMixin):
        raise ValueError("this trainer already has OrthoReg; set trainer.orthoreg_lambda instead")
    trainer.__class__ = _with_orthoreg(type(trainer))
    trainer._init_orthoreg(lam, squared, include, exclude, reference)  # type: ignore[attr-defined]
    return trainer


# ============================================================================ state loading
def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def _read_safetensors_dir(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise ValueError(
            f"{directory}: only pickled weights found; orthoreg reads safetensors only "
            "(load the model with transformers and pass the module instead)"
        )
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_state(source: StateSource) -> dict[str, Tensor]:
    """Tensors of a model, a state dict, a checkpoint directory or a ``.safetensors`` file.

    Directories are read straight from their safetensors files, without instantiating the
    architecture, so any transformers model works; pickled ``.bin`` checkpoints are refused.
    (For an architecture whose transformers class renames checkpoint keys on load, pass the
    loaded module instead.)
    """
    if isinstance(source, nn.Module):
        if _is_peft_model(source):
            raise TypeError(
                "a PeftModel holds an adapter, not a fine-tuned model: use "
                "task_vector_from_peft(model), or merge_and_unload() it first"
            )
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        return {k: v.detach() for k, v in source.items()}
    path = Path(source)
    if path.is_dir():
        return _read_safetensors_dir(path)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    raise FileNotFoundError(f"{path}: not a model directory or a .safetensors file")


def _describe(source: Any) -> str | None:
    """A human-readable origin for provenance records."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    config = getattr(source, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def align_names(reference: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """Map ``names`` onto ``reference`` names: identical, or differing by one leading prefix.

    A checkpoint of ``BertModel`` names ``encoder.…`` what ``BertForSequenceClassification``
    calls ``bert.encoder.…``; task vectors are named in the base model's coordinates, so
    the other side is renamed by stripping or adding the one prefix that matches most.
    Returns ``{name: reference_name}`` for every name that found a partner.
    """
    reference = set(reference)
    names = list(names)
    prefixes = {n.split(".", 1)[0] + "." for n in names if "." in n}
    prefixes |= {n.split(".", 1)[0] + "." for n in reference if "." in n}
    candidates: list[dict[str, str]] = [{n: n for n in names if n in reference}]
    for prefix in sorted(prefixes):
        stripped = {n: n[len(prefix):] for n in names if n.startswith(prefix)}
        candidates.append({n: r for n, r in stripped.items() if r in reference})
        candidates.append({n: prefix + n for n in names if prefix + n in reference})
    return max(candidates, key=len)


def _subset_fingerprint(base: Mapping[str, Tensor], keys: Iterable[str]) -> str:
    """Base fingerprint over the vector's own keys.

    Restricting to the keys makes the record the same whether θ0 came as a module, a state
    dict or a directory (their extra buffers and tied copies differ), while vectors from
    different θ0 still disagree.
    """
    return fingerprint_state({k: base[k] for k in keys})


# ============================================================================ task vectors
def task_vector_from_pretrained(
    base: StateSource,
    finetuned: StateSource,
    *,
    include: Sequence[str] | None = None,
    paradigm: str = "full",
    dtype: torch.dtype | None = torch.float32,
    metadata: Mapping[str, Any] | None = None,
) -> TaskVector:
    """τ = θ_ft − θ0 over every floating tensor the two share, in the base's names.

    ``base`` and ``finetuned`` are transformers models (or any modules), state dicts, or
    checkpoint directories; a task head present only in ``finetuned`` is not part of θ0 and
    is left out (listed under ``metadata["not_in_base"]``). ``include`` (name globs, in the
    base's names) keeps only some tensors, e.g. the attention weights of attention-only
    fine-tuning. Restrict here rather than by hand afterwards: the recorded base fingerprint
    covers exactly the vector's keys. Differences are taken in ``dtype`` (float32 by
    default: bf16 differences of nearby weights lose most bits).
    """
    base_state = load_state(base)
    ft_state = load_state(finetuned)
    mapping = align_names(base_state, ft_state)
    keys = [
        mapping[name] for name in ft_state
        if name in mapping and torch.is_floating_point(ft_state[name])
        and torch.is_floating_point(base_state[mapping[name]])
    ]
    if include is not None:
        keys = [k for k in keys if any(fnmatch.fnmatchcase(k, pattern) for pattern in include)]
    if not keys:
        what = "floating tensor matching include" if include else "floating tensor"
        raise TaskVectorMismatch(
            f"base and fine-tuned models share no {what} (first fine-tuned name: "
            f"{next(iter(ft_state), None)!r}, first base name: {next(iter(base_state), None)!r})"
        )
    renamed = {mapping[name]: tensor for name, tensor in ft_state.items() if name in mapping}

    def convert(t: Tensor) -> Tensor:
        return t if dtype is None else t.to(dtype)

    meta = {
        "paradigm": paradigm,
        "source": "transformers",
        "base_name_or_path": _describe(base),
        "finetuned_name_or_path": _describe(finetuned),
        "not_in_base": sorted(n for n in ft_state if n not in mapping),
        **(metadata or {}),
    }
    vector = TaskVector.from_state_dicts(
        {k: convert(base_state[k]) for k in keys},
        {k: convert(renamed[k]) for k in keys},
        keys=keys,
        metadata=meta,
    )
    vector.metadata["base_fingerprint"] = _subset_fingerprint(base_state, keys)
    return vector


def _lora_modules(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    found = []
    for path, module in model.named_modules():
        factors = getattr(module, "lora_A", None)
        embeds = getattr(module, "lora_embedding_A", None)
        has = (isinstance(factors, nn.ModuleDict) and adapter_name in factors) or (
            isinstance(embeds, nn.ParameterDict) and adapter_name in embeds
        )
        if has:
            found.append((path, module))
    return found


def _weight_name(module_path: str, module: nn.Module) -> str:
    """The base parameter an adapter updates: ``<module>.weight`` with PEFT's wrappers removed."""
    parts = [part for part in module_path.split(".") if part != "base_layer"]
    path = _strip_peft_prefix(".".join(parts))
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    leaf = "in_proj_weight" if isinstance(base, nn.MultiheadAttention) else "weight"
    return f"{path}.{leaf}" if path else leaf


def _strip_peft_prefix(name: str) -> str:
    """Drop PeftModel's ``base_model.model.`` wrapper, also when a PeftModel is nested."""
    if name.startswith(PEFT_PREFIX):
        return name[len(PEFT_PREFIX):]
    return name.replace("." + PEFT_PREFIX, ".", 1)


def _deltas_from_module(
    model: nn.Module, adapter_name: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Dense s·B·A per adapted module (PEFT's own ``get_delta_weight``) and its W0."""
    modules = _lora_modules(model, adapter_name)
    if not modules:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} in this model")
    deltas: dict[str, Tensor] = {}
    weights0: dict[str, Tensor] = {}
    for path, module in modules:
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            raise NotImplementedError(
                f"{path}: DoRA's update is not s·B·A; merge_and_unload() and use "
                "task_vector_from_pretrained"
            )
        if adapter_name in getattr(module, "merged_adapters", []):
            raise ValueError(
                f"{path}: adapter {adapter_name!r} is merged into the base weight; unmerge it"
            )
        name = _weight_name(path, module)
        with torch.no_grad():
            deltas[name] = module.get_delta_weight(adapter_name).detach().float().clone()
        base_layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        leaf = "in_proj_weight" if isinstance(base_layer, nn.MultiheadAttention) else "weight"
        weights0[name] = getattr(base_layer, leaf).detach()
    config = getattr(model, "peft_config", {}).get(adapter_name)
    info = {
        "adapter_name": adapter_name,
        "base_name_or_path": getattr(config, "base_model_name_or_path", None),
        "rank": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
    }
    return deltas, weights0, info


def _read_adapter_dir(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    config_file = directory / "adapter_config.json"
    weights_file = directory / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json")
    if not weights_file.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(f"{directory}: pickled adapter_model.bin refused; resave as safetensors")
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors")
    return json.loads(config_file.read_text()), load_file(str(weights_file))


def _scale(config: Mapping[str, Any], module_path: str) -> float:
    """PEFT's scaling for one module: α/r (α/√r with rsLoRA), per-module patterns first."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_path), config["r"])
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), module_path), config["lora_alpha"]
    )
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")


def _deltas_from_dir(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """Dense updates straight from a saved adapter (plain LoRA on Linear/Conv1D/Embedding).

    Reading the file needs no base model. Anything whose update is not s·B·A (DoRA, LoRA
    biases, convolutional kernels, other PEFT methods) is refused; load the adapter into
    its base with PEFT and pass the PeftModel for those.
    """
    config, tensors = _read_adapter_dir(directory)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise NotImplementedError(f"{directory}: peft_type {config.get('peft_type')!r} is not LoRA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise NotImplementedError(
                f"{directory}: {flag}=True adapters are not plain s·B·A; pass the loaded "
                "PeftModel instead"
            )
    factors: dict[str, dict[str, Tensor]] = {}
    skipped = []
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key) or _EMBED_KEY.match(key)
        if match is None:
            skipped.append(key)  # modules_to_save copies, trainable tokens, …
            continue
        kind = match["kind"].replace("lora_embedding_", "embed_").replace("lora_", "")
        factors.setdefault(match["module"], {})[kind] = tensor
    if not factors:
        raise ValueError(f"{directory}: the adapter holds no LoRA factors")
    deltas = {}
    for module, parts in factors.items():
        scale = _scale(config, _strip_peft_prefix(module))
        if "A" in parts and "B" in parts:
            a, b = parts["A"].float(), parts["B"].float()
            if a.ndim != 2 or b.ndim != 2:
                raise NotImplementedError(f"{module}: convolutional LoRA is not supported here")
            delta = b @ a * scale
            if config.get("fan_in_fan_out"):
                delta = delta.T
        elif "embed_A" in parts and "embed_B" in parts:
            delta = (parts["embed_B"].float() @ parts["embed_A"].float()).T * scale
        else:
            raise ValueError(f"{directory}: {module} has only one LoRA factor")
        deltas[f"{_strip_peft_prefix(module)}.weight"] = delta.contiguous()
    info = {
        "adapter_dir": str(directory),
        "base_name_or_path": config.get("base_model_name_or_path"),
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
    }
    return deltas, info, sorted(skipped)


def task_vector_from_peft(
    adapter: nn.Module | str | os.PathLike[str],
    base: StateSource | None = None,
    *,
    adapter_name: str = "default",
    paradigm: str = "lora",
    metadata: Mapping[str, Any] | None = None,
) -> TaskVector:
    """The dense LoRA update s·B·A of every adapted module, named ``<module>.weight``.

    ``adapter`` is a PEFT model (any module with PEFT LoRA layers; PEFT's own
    ``get_delta_weight`` is used) or a saved adapter directory (read directly, no base
    model needed). ``base`` — a model, state dict or directory — renames the vector into
    its parameter names (``bert.encoder…`` vs ``encoder…``), checks the shapes and supplies
    the base fingerprint; without it a PeftModel's own frozen base weights are fingerprinted
    and a bare directory's vector carries no fingerprint. ``modules_to_save`` copies (e.g.
    a task head) are full weights, not updates, and are left out (listed in the metadata).
    """
    weights0: dict[str, Tensor] | None = None
    if isinstance(adapter, nn.Module):
        deltas, weights0, info = _deltas_from_module(adapter, adapter_name)
        left_out: list[str] = []
    else:
        deltas, info, left_out = _deltas_from_dir(Path(adapter))
    meta: dict[str, Any] = {
        "paradigm": paradigm,
        "source": "peft",
        **info,
        "not_in_vector": left_out,
        **(metadata or {}),
    }
    if base is not None:
        base_state = load_state(base)
        mapping = align_names(base_state, deltas)
        missing = [name for name in deltas if name not in mapping]
        if missing:
            raise TaskVectorMismatch(f"base model has no weight for adapted module {missing[0]!r}")
        deltas = {mapping[name]: delta for name, delta in deltas.items()}
        for name, delta in deltas.items():
            if tuple(base_state[name].shape) != tuple(delta.shape):
                raise TaskVectorMismatch(
                    f"{name!r}: adapter update {tuple(delta.shape)} vs base weight "
                    f"{tuple(base_state[name].shape)}"
                )
        meta["base_fingerprint"] = _subset_fingerprint(base_state, deltas)
        meta["base_name_or_path"] = _describe(base) or meta.get("base_name_or_path")
    elif weights0 is not None:
        meta["base_fingerprint"] = _subset_fingerprint(weights0, deltas)
    return TaskVector(deltas, meta)


# ============================================================================ export
def _as_vectors(vector: TaskVector | Sequence[TaskVector]) -> list[TaskVector]:
    vectors = [vector] if isinstance(vector, TaskVector) else list(vector)
    if not vectors:
        raise ValueError("save_merged needs at least one task vector")
    return vectors


def _lambda_text(record: Mapping[str, Any]) -> str:
    if record.get("lambda") is None:
        return "not recorded"
    form = "squared ‖G − I‖²_F" if record.get("squared") else "plain ‖G − I‖_F"
    return f"{record['lambda']} ({form} penalty)"


def _card_text(record: Mapping[str, Any]) -> str:
    """A small model card: YAML front matter for the Hub, then a human-readable record."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- orthoreg",
        "- model-merging",
        "- task-arithmetic",
    ]
    if record.get("base_model_id"):
        lines.append(f"base_model: {record['base_model_id']}")
    lines += [
        "---",
        "",
        "# Merged model (orthoreg)",
        "",
        f"θ = θ0 + α·Σ_t τ_t with **α = {record['alpha']:g}**, merge method "
        f"**{record['method']}**, over {len(record['vectors'])} task vector(s).",
        "",
        f"- base model: `{record.get('base_name_or_path')}` "
        f"(fingerprint `{record.get('base_fingerprint')}`)",
        f"- OrthoReg λ: {_lambda_text(record)}",
        "",
        "| # | task | paradigm | λ | tensors | ‖τ‖ |",
        "|---|---|---|---|---|---|",
    ]
    for i, item in enumerate(record["vectors"]):
        lines.append(
            f"| {i} | {item.get('task')} | {item.get('paradigm')} | {item.get('lambda')} | "
            f"{item['tensors']} | {item['norm']:.4g} |"
        )
    lines += [
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        "The full record is in `orthoreg_merge.json`. OrthoReg: Liu et al., CVPR 2026, "
        "arXiv 2604.17078.",
        "",
    ]
    return "\n".join(lines)


def _replace_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move a finished directory into place; an old one is swapped out, then deleted."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _merged_tensors(
    state: Mapping[str, Tensor], vectors: Sequence[TaskVector], alpha: float
) -> tuple[dict[str, Tensor], str]:
    """θ0 + α·Σ τ for the tensors the vectors name (in ``state``'s names), and θ0's fingerprint.

    Vectors whose recorded base fingerprint disagrees with ``state`` are refused. The sum
    is formed in float32 and cast back to each weight's dtype once.
    """
    total = sum(vectors)
    assert isinstance(total, TaskVector)
    mapping = align_names(state, total.keys())
    missing = [name for name in total.keys() if name not in mapping]
    if missing:
        raise TaskVectorMismatch(f"base model has no tensor {missing[0]!r} named by the vector")
    # fingerprinted under the vector's own names, as the vectors themselves were
    fingerprint = fingerprint_state({n: state[mapping[n]] for n in total.keys()})
    for item in vectors:
        expected = item.metadata.get("base_fingerprint")
        if expected is not None and expected != fingerprint:
            raise TaskVectorMismatch(
                f"task vector {item.metadata.get('task')!r} was made from another base model "
                f"(fingerprint {expected} vs {fingerprint})"
            )
    updated = {}
    with torch.no_grad():
        for name, delta in total.items():
            weight = state[mapping[name]].detach()
            if tuple(weight.shape) != tuple(delta.shape):
                raise TaskVectorMismatch(
                    f"{name!r}: vector shape {tuple(delta.shape)} vs model {tuple(weight.shape)}"
                )
            summed = weight.float() + alpha * delta.to(weight.device).float()
            updated[mapping[name]] = summed.to(weight.dtype)
    return updated, fingerprint


def save_merged(
    base_model: nn.Module,
    vector: TaskVector | Sequence[TaskVector],
    alpha: float,
    out_dir: str | os.PathLike[str],
    card_info: Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write θ0 + α·Σ τ as a reloadable transformers checkpoint, with a model card.

    ``base_model`` (a ``PreTrainedModel``, left unchanged) supplies θ0, the config and the
    architecture; several vectors are added first (task addition). Weights go through
    ``save_pretrained`` as safetensors, next to ``README.md`` (model card) and
    ``orthoreg_merge.json`` (the machine-readable record: method, α, each vector's
    provenance, λ, versions, plus anything in ``card_info``). Everything is written to a
    temporary sibling directory and renamed into place, so ``out_dir`` is never left half
    written. A vector whose base fingerprint disagrees with ``base_model`` is refused.
    """
    if not hasattr(base_model, "save_pretrained"):
        raise TypeError("save_merged needs a transformers model (with save_pretrained)")
    if _is_peft_model(base_model):
        raise TypeError("pass the base transformers model, not a PeftModel")
    vectors = _as_vectors(vector)
    state = dict(base_model.state_dict())
    updated, fingerprint = _merged_tensors(state, vectors, alpha)
    merged = {**state, **updated}

    info = dict(card_info or {})
    lambdas = [item.metadata.get("lambda") for item in vectors]
    record = {
        "kind": "orthoreg.merged_model",
        "method": info.pop("method", "task_arithmetic"),
        "alpha": float(alpha),
        "lambda": info.pop("lambda", lambdas[0] if len(set(map(str, lambdas))) == 1 else lambdas),
        "squared": info.pop("squared", vectors[0].metadata.get("squared")),
        "base_name_or_path": _describe(base_model),
        "base_model_id": info.pop("base_model_id", None),
        "base_fingerprint": fingerprint,
        "vectors": [
            {
                "task": item.metadata.get("task"),
                "paradigm": item.metadata.get("paradigm"),
                "lambda": item.metadata.get("lambda"),
                "squared": item.metadata.get("squared"),
                "base_fingerprint": item.metadata.get("base_fingerprint"),
                "tensors": len(item),
                "norm": item.norm(),
            }
            for item in vectors
        ],
        "versions": versions(),
        **info,
    }

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_kwargs: dict[str, Any] = {"state_dict": merged}
        if "safe_serialization" in inspect.signature(base_model.save_pretrained).parameters:
            save_kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always is
        base_model.save_pretrained(tmp, **save_kwargs)
        if not any(tmp.glob("*.safetensors")) or any(tmp.glob("*.bin")):
            raise RuntimeError(f"save_pretrained did not write safetensors into {tmp}")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "orthoreg_merge.json", record)
        atomic_write_text(tmp / "README.md", _card_text(record))
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merged_copy(
    base_model: nn.Module, vector: TaskVector | Sequence[TaskVector], alpha: float
) -> nn.Module:
    """An in-memory θ0 + α·Σ τ (a deep copy; ``base_model`` is left unchanged).

    Uses the same arithmetic as :func:`save_merged`, so the two agree bit for bit.
    """
    model = copy.deepcopy(base_model)
    state = dict(model.state_dict(keep_vars=True))
    updated, _ = _merged_tensors(state, _as_vectors(vector), alpha)
    with torch.no_grad():
        for name, tensor in updated.items():
            state[name].copy_(tensor)
    return model
