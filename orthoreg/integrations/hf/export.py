"""Merged models out: θ0 + α·Σ τ as a reloadable transformers checkpoint, or in memory.

:func:`save_merged` writes the merged weights as safetensors next to a model card
(``README.md``, with Hub front matter) and ``orthoreg_merge.json`` (the machine-readable
record: method, α, each vector's provenance and λ, versions); :func:`merged_copy` builds
the same model in memory. Both go through one function for the arithmetic and the
base-fingerprint check, so they agree bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from orthoreg.integrations.hf.state import _describe, _is_peft_model, align_names
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.io import atomic_write_json, atomic_write_text
from orthoreg.utils.provenance import fingerprint_state, versions


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
