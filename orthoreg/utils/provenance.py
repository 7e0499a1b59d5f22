"""What every result file records: config, versions, seed, git commit and torch threads."""

from __future__ import annotations

import hashlib
import platform
import random
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a dedicated torch generator.

    Code that draws random numbers for data order or dropout masks should take the
    returned generator rather than the global one, so that resuming a run can restore it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@cache
def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    from orthoreg._version import __version__

    found = {
        "orthoreg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in ("peft", "safetensors", "transformers", "open_clip"):
        try:
            module = __import__(name)
            found[name] = str(getattr(module, "__version__", "?"))
        except Exception:  # optional packages: absent is fine
            continue
    return found


def provenance(seed: int | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A record to embed in every result and checkpoint file.

    ``torch_threads``: float reductions are split by the intra-op thread count, so results
    are bit-identical only between runs with the same count (orthoreg.utils.threads).
    """
    record: dict[str, Any] = {"versions": versions(), "git_commit": git_commit(),
                              "torch_threads": torch.get_num_threads()}
    if seed is not None:
        record["seed"] = seed
    if config is not None:
        record["config"] = dict(config)
    return record


def fingerprint_state(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a state dict: names, shapes, dtypes and every byte of every tensor.

    Task vectors carry the fingerprint of their base model, so vectors fine-tuned from
    different θ0 cannot be combined by accident.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        cpu = tensor.to("cpu").contiguous()
        if cpu.dtype == torch.bfloat16:
            cpu = cpu.view(torch.int16)
        digest.update(cpu.numpy().tobytes())
    return digest.hexdigest()[:16]
