"""An output directory that is locked, cached by content keys, and written atomically.

Stages (a fine-tune, an addition search, ...) are addressed by a hash of everything that
determines their result. A stage is done when its ``result.json`` exists; it is written
last, atomically, so an interrupted stage is simply redone (and a fine-tune resumes from
its checkpoint), while a finished one is never recomputed or overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from orthoreg.errors import OrthoRegError, RunLocked
from orthoreg.utils.io import atomic_write_bytes, atomic_write_json

LOCK = ".orthoreg.lock"


def stage_key(kind: str, spec: Mapping[str, Any]) -> str:
    blob = json.dumps({"kind": kind, **spec}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


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
        self._fd: int | None = None  # the flock'd lock file (POSIX)
        self._locked = False  # held through the pid-file fallback

    def __enter__(self) -> Workspace:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the directory; a second live process is refused, a stale lock is taken over.

        On POSIX the lock is an exclusive ``flock`` on the lock file, which the kernel drops
        when its process dies: a lock is stale exactly when no live process holds it,
        whatever pid the file names (a crashed run's pid may since belong to an unrelated
        process) and whether or not its holder has written that pid yet. The pid is only
        for the message.
        """
        if self._fd is not None or self._locked:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / LOCK
        if fcntl is None:  # pragma: no cover - no flock (Windows)
            self._acquire_by_pid(lock)
            return
        for _ in range(100):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise RunLocked(f"{self.root} is in use by process {holder or '?'}; wait for "
                                "it or choose another --out directory") from None
            except OSError as exc:  # pragma: no cover - a filesystem without locks
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._acquire_by_pid(lock)
                return
            try:
                current = os.stat(lock).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)  # its holder released and removed it after our open: retry
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return
        raise RunLocked(f"could not lock {self.root}")

    def _acquire_by_pid(self, lock: Path) -> None:
        """Fallback without flock: an exclusively created file naming a live pid."""
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
        if self._fd is not None:
            # unlink while still holding it: a process that opened this file meanwhile
            # sees, once it gets the flock, that the path no longer names it, and retries
            (self.root / LOCK).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
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


@dataclass(frozen=True)
class GatherReport:
    """What :func:`gather` did: stages added, already present, and skipped unfinished."""

    added: int
    present: int
    unfinished: int


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link (a stage's files are never rewritten once finished), else copy atomically."""
    try:
        os.link(src, dst)
    except OSError:
        atomic_write_bytes(Path(dst), Path(src).read_bytes())


def gather(dest: str | os.PathLike[str],
           sources: list[str | os.PathLike[str]]) -> GatherReport:
    """Merge the finished stages of several output directories into ``dest``.

    Why: a long benchmark is cheapest split into processes (one per paradigm, or per
    machine) that each write their own directory; the stage keys depend only on what
    determines each stage, so once gathered, ``orthoreg demo`` on the whole config in
    ``dest`` reuses every stage and only writes the report. Finished stages are immutable
    (``result.json`` is written last), so gathering from a run still in progress is safe;
    its unfinished stages are skipped. Every conflict is found before anything is written:
    a key finished in two places with different results is an error naming it. A stage's
    ``result.json`` is placed last, so an interrupted gather leaves only stages that
    ``orthoreg demo`` redoes.
    """
    root = Path(dest)
    for source in sources:
        if not (Path(source) / "stages").is_dir():
            raise OrthoRegError(f"{source}: not an orthoreg output directory (no stages/)")
        if Path(source).resolve() == root.resolve():
            raise OrthoRegError(f"{source}: is the destination itself")
    chosen: dict[str, Path] = {}
    unfinished = 0
    for source in sources:
        for stage in sorted((Path(source) / "stages").iterdir()):
            result = stage / "result.json"
            if not result.is_file():
                unfinished += 1
                continue
            previous = chosen.get(stage.name)
            if previous is None:
                chosen[stage.name] = stage
            elif (previous / "result.json").read_bytes() != result.read_bytes():
                raise OrthoRegError(f"stage {stage.name} is finished in {previous.parent.parent} "
                                    f"and {source} with different results; gather one of them")
    added = present = 0
    with Workspace(root) as ws:
        for key, stage in chosen.items():
            target = root / "stages" / key
            done = target / "result.json"
            if done.is_file():
                if done.read_bytes() != (stage / "result.json").read_bytes():
                    raise OrthoRegError(f"stage {key} is finished in {root} and "
                                        f"{stage.parent.parent} with different results")
                present += 1
                continue
            folder = ws.stage_dir(key)
            for item in sorted(stage.iterdir()):
                if item.is_dir():
                    shutil.copytree(item, folder / item.name, copy_function=_link_or_copy,
                                    dirs_exist_ok=True)
                elif item.name != "result.json":
                    (folder / item.name).unlink(missing_ok=True)
                    _link_or_copy(item, folder / item.name)
            _link_or_copy(stage / "result.json", done)
            added += 1
    return GatherReport(added, present, unfinished)
