"""Task vectors from transformers models, checkpoints and PEFT LoRA adapters.

:func:`task_vector_from_pretrained` (θ_ft − θ0 of two models or checkpoints) and
:func:`task_vector_from_peft` (the dense s·B·A of each adapted module) name every tensor by
the *base model's* parameter name, so full and LoRA vectors merge alike, and record the
base fingerprint over exactly the vector's keys, so a merge can refuse a vector made from
another base model.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from orthoreg.integrations.hf.state import StateSource, _describe, align_names, load_state
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.provenance import fingerprint_state

#: the prefix PeftModel puts in front of the wrapped model's module names
PEFT_PREFIX = "base_model.model."


def _subset_fingerprint(base: Mapping[str, Tensor], keys: Iterable[str]) -> str:
    """Base fingerprint over the vector's own keys.

    Restricting to the keys makes the record the same whether θ0 came as a module, a state
    dict or a directory (their extra buffers and tied copies differ), while vectors from
    different θ0 still disagree.
    """
    return fingerprint_state({k: base[k] for k in keys})


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
