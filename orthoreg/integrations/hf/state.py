"""Model state from wherever it lives, and name alignment between two models' coordinates.

:func:`load_state` reads the tensors of a module, a state dict, a checkpoint directory or a
``.safetensors`` file; directories are read from their safetensors files without building
the architecture, and pickled checkpoints are refused. :func:`align_names` maps one
model's parameter names onto another's when they differ by a leading prefix (a
``BertModel`` checkpoint vs ``BertForSequenceClassification``). The task-vector
constructors and the merged export share these helpers, so both sides align names and
record origins the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

StateSource = nn.Module | str | os.PathLike[str] | Mapping[str, Tensor]


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
