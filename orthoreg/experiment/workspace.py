"""An output directory that is locked, cached by content keys, and written atomically.

Stages (a fine-tune, an addition search, ...) are addressed by a hash of everything that
determines their result. A stage is done when its ``result.json`` exists; it is written
last, atomically, so an interrupted stage is simply redone (and a fine-tune resumes from
its checkpoint), while a finished one is never recomputed or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orthoreg.errors import RunLocked
from orthoreg.utils.io import atomic_write_json

LOCK = ".orthoreg.lock"


def stage_key(kind: str, spec: Mapping[str, Any]) -> str:
    blob = json.dumps({"kind": kind, **spec}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workspace:
    """``out/`` with a lock file, ``stages/<key>/`` caches and top-level result files."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._locked = False

    def __enter__(self) -> Workspace:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the directory; a second live process is refused, a stale lock is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    holder = 0
                if holder and holder != os.getpid() and _pid_alive(holder):
                    raise RunLocked(f"{self.root} is in use by process {holder}; wait for it or "
                                    "choose another --out directory") from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            self._locked = True
            return
        raise RunLocked(f"could not lock {self.root}")

    def release(self) -> None:
        if self._locked:
            (self.root / LOCK).unlink(missing_ok=True)
            self._locked = False

    def stage_dir(self, key: str) -> Path:
        path = self.root / "stages" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, key: str) -> dict[str, Any] | None:
        result = self.root / "stages" / key / "result.json"
        if not result.is_file():
            return None
        try:
            record = json.loads(result.read_bytes())
        except (OSError, ValueError):  # truncated, not UTF-8, not JSON
            return None  # unreadable: treat as unfinished and redo
        return record if isinstance(record, dict) else None

    def finish(self, key: str, result: Mapping[str, Any]) -> dict[str, Any]:
        atomic_write_json(self.stage_dir(key) / "result.json", dict(result))
        return dict(result)
