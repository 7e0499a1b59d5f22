"""Crash-safe writes and code-free tensor files.

Every file the project writes goes through :func:`atomic_write_bytes`: a temporary file in
the same directory, flushed and fsynced, then renamed over the target. A crash leaves
either the old file or the new one, never half of either. Tensors are stored as
safetensors with a JSON record in the header, so loading a file never executes code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from orthoreg.errors import OrthoRegError

METADATA_KEY = "orthoreg"
#: header field with the tensors' names in the writer's order (safetensors keeps no order)
ORDER_KEY = "orthoreg.order"


class OrthoRegFileError(OrthoRegError, ValueError):
    """A file is missing, truncated, corrupted, or not what the caller expected."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Store tensors plus a JSON-serialisable record, atomically, as safetensors."""
    prepared = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {METADATA_KEY: json.dumps(dict(metadata or {}), default=str),
              ORDER_KEY: json.dumps(list(prepared))}
    return atomic_write_bytes(path, _st_save(prepared, metadata=header))


def read_tensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; every failure is an OrthoRegFileError.

    Only the safetensors format is accepted: a pickle (or anything else) is refused before
    a single byte of it is interpreted as code.
    """
    path = Path(path)
    if not path.is_file():
        raise OrthoRegFileError(f"no such file: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise OrthoRegFileError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8 or data[8:9] != b"{":
        raise OrthoRegFileError(
            f"{path}: not a safetensors file (pickled or corrupted checkpoints are refused; "
            "convert trusted legacy files with torch.load(weights_only=True) first)"
        )
    try:
        raw_header = json.loads(data[8 : 8 + header_len])
        tensors = _st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise OrthoRegFileError(f"{path}: corrupted safetensors file ({exc})") from exc
    header_meta = raw_header.get("__metadata__") or {}
    try:
        metadata = json.loads(header_meta.get(METADATA_KEY, "{}"))
        order = json.loads(header_meta.get(ORDER_KEY, "[]"))
    except json.JSONDecodeError as exc:
        raise OrthoRegFileError(f"{path}: corrupted metadata record ({exc})") from exc
    if not isinstance(metadata, dict):
        raise OrthoRegFileError(f"{path}: metadata record is not a JSON object")
    # safetensors returns names in a per-process random order; restore the writer's order
    # (or the header's, for files from elsewhere) so that loaded vectors iterate, sum and
    # report the same way in every process
    if not (isinstance(order, list) and all(isinstance(name, str) for name in order)
            and sorted(order) == sorted(tensors)):
        order = [name for name in raw_header if name != "__metadata__"]
    tensors = {name: tensors[name] for name in order}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata
