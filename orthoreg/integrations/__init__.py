"""Bridges from orthoreg to other training stacks.

Each submodule imports its stack on import, so ``import orthoreg.integrations`` itself stays
free of optional dependencies:

- :mod:`orthoreg.integrations.hf` — Hugging Face ``transformers.Trainer`` (full fine-tuning
  and PEFT LoRA), task vectors from checkpoints and adapters, merged-model export.
  Needs the ``hf`` extra: ``pip install 'orthoreg[hf]'``.
"""
