"""OrthoReg as a drop-in for the Hugging Face stack: Trainer, PEFT adapters, export.

- :mod:`~orthoreg.integrations.hf.trainer` — :class:`OrthoRegTrainer` (or
  :func:`add_orthoreg` on an existing ``Trainer``) minimises ``L_task + λ·Σ_l R(ΔW_l)``,
  for full fine-tuning and, in exact low-rank form, PEFT LoRA; its docstring says which
  Trainer hook carries the penalty and why, and how gradient accumulation is handled.
- :mod:`~orthoreg.integrations.hf.state` — :func:`load_state` reads tensors from modules,
  state dicts and safetensors checkpoints (never pickles); :func:`align_names` maps
  ``bert.encoder.…`` onto ``encoder.…``.
- :mod:`~orthoreg.integrations.hf.vectors` — :func:`task_vector_from_pretrained` and
  :func:`task_vector_from_peft` name every tensor by the base model's parameter name, so
  full and LoRA vectors merge alike.
- :mod:`~orthoreg.integrations.hf.export` — :func:`save_merged` writes θ0 + α·Σ τ as a
  safetensors checkpoint with a model card; :func:`merged_copy` builds it in memory.

Importing this package needs the ``hf`` extra: ``pip install 'orthoreg[hf]'``.
"""

from orthoreg.integrations.hf.export import merged_copy, save_merged
from orthoreg.integrations.hf.state import StateSource, align_names, load_state
from orthoreg.integrations.hf.trainer import (
    OrthoRegMixin,
    OrthoRegTrainer,
    add_orthoreg,
    capture_reference,
)
from orthoreg.integrations.hf.vectors import (
    PEFT_PREFIX,
    task_vector_from_peft,
    task_vector_from_pretrained,
)

__all__ = [
    "PEFT_PREFIX",
    "OrthoRegMixin",
    "OrthoRegTrainer",
    "StateSource",
    "add_orthoreg",
    "align_names",
    "capture_reference",
    "load_state",
    "merged_copy",
    "save_merged",
    "task_vector_from_peft",
    "task_vector_from_pretrained",
]
