"""Two processes, one output directory: the second is refused, nothing is corrupted, and a
lock whose process is gone is taken over.

Holders are forked children (cheap: orthoreg is already imported), so each test runs a
real second process without paying for a fresh interpreter.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest
from reliability_helpers import TINY_CONFIG, run_cli

from orthoreg.errors import RunLocked
from orthoreg.experiment.workspace import LOCK, Workspace

FORK = multiprocessing.get_context("fork")


def _hold(root: str, ready, release, blank_pid: bool) -> None:
    workspace = Workspace(root)
    workspace.acquire()
    workspace.finish("finetune-held", {"by": "holder"})
    if blank_pid:  # the moment between creating the lock and writing the pid into it
        Path(root, LOCK).write_text("")
    ready.set()
    release.wait(30)
    workspace.release()


class Holder:
    """A forked process that holds ``root`` until the ``with`` block ends."""

    def __init__(self, root: Path, blank_pid: bool = False) -> None:
        self.ready, self.release = FORK.Event(), FORK.Event()
        self.process = FORK.Process(target=_hold, args=(str(root), self.ready, self.release,
                                                        blank_pid))

    def __enter__(self) -> Holder:
        self.process.start()
        assert self.ready.wait(30), "the holder did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.process.join(30)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK}


def test_second_run_on_the_same_directory_is_refused_by_the_cli(tmp_path: Path):
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY_CONFIG))
    with Holder(out) as holder:
        before = _files(out)
        result = run_cli(["demo", "--config", str(config), "--out", str(out), "--no-progress"])
        assert result.code == 2 and "Traceback" not in result.err
        assert result.err.count("\n") == 1
        assert f"in use by process {holder.process.pid}" in result.err
        assert _files(out) == before  # the refused run wrote nothing
    assert holder.process.exitcode == 0
    with Workspace(out) as workspace:  # free again once the holder is gone
        assert workspace.done("finetune-held") == {"by": "holder"}


def test_a_lock_whose_pid_is_not_written_yet_is_not_stolen(tmp_path: Path):
    """The holder is alive: liveness must not hinge on the lock file's content."""
    with Holder(tmp_path, blank_pid=True), pytest.raises(RunLocked):
        Workspace(tmp_path).acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path):
    (tmp_path / LOCK).write_text(str(_dead_pid()))
    with Workspace(tmp_path):
        assert (tmp_path / LOCK).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK).exists()


def test_stale_lock_naming_a_reused_pid_is_taken_over(tmp_path: Path):
    """After a crash the recorded pid may belong to an unrelated live process (pid 1 here);
    nobody holds the directory, so the lock is stale all the same."""
    (tmp_path / LOCK).write_text("1")
    with Workspace(tmp_path):
        pass


def _race(root: str, start: float, results) -> None:
    while time.time() < start:
        pass
    workspace = Workspace(root)
    try:
        workspace.acquire()
    except RunLocked:
        results.put(None)
        return
    began = time.monotonic()
    time.sleep(0.05)
    results.put((began, time.monotonic()))
    workspace.release()


def test_racing_processes_never_hold_the_directory_together(tmp_path: Path):
    """Six processes released at the same instant on a directory with a stale lock: the
    intervals in which each believed it held the directory never overlap."""
    dead = _dead_pid()
    for round_ in range(5):
        root = tmp_path / str(round_)
        root.mkdir()
        (root / LOCK).write_text(str(dead))
        results = FORK.Queue()
        start = time.time() + 0.15
        racers = [FORK.Process(target=_race, args=(str(root), start, results))
                  for _ in range(6)]
        for racer in racers:
            racer.start()
        held = sorted(r for r in (results.get(timeout=30) for _ in racers) if r is not None)
        for racer in racers:
            racer.join(30)
        assert held, "nobody got the lock"
        for (_, first_end), (second_start, _) in itertools.pairwise(held):
            assert second_start >= first_end, f"round {round_}: two holders at once"
