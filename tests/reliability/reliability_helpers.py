"""Helpers of the reliability tests: hostile files, the tiny run's config, the CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {
    "name": "tiny", "model": "tiny_cnn", "tasks": ["synthetic_blobs"], "control": "digits",
    "paradigms": {"full": {"lr": 1e-3}},
    "data": {"max_train": 32, "max_val": 8, "max_test": 8, "shots": 2, "resolution": 16},
    "train": {"steps": 2, "batch_size": 8, "warmup_steps": 0},
    "selection": {"lambdas": [1.0], "lr_multipliers": [1.0]},
    "alphas": {"num": 3}, "negation_thresholds": [0.5],
}


class OpenPayload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemPayload:
    """Unpickling this runs ``touch marker`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Hostile:
    """A file whose loading with pickle/torch.load would create ``marker``."""

    kind: str
    write: Callable[[Path, Path], None]


def _write_pickle(payload: type) -> Callable[[Path, Path], None]:
    def write(path: Path, marker: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps({"weight": payload(marker)}, protocol=2))

    return write


def _write_torch_save(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "hook": OpenPayload(marker)}, path)


def _write_protocol0(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(OpenPayload(marker), protocol=0))


HOSTILE = [
    Hostile("pickle-open", _write_pickle(OpenPayload)),
    Hostile("pickle-os-system", _write_pickle(SystemPayload)),
    Hostile("pickle-protocol-0", _write_protocol0),
    Hostile("torch-save-zip", _write_torch_save),
]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> CliResult:
    """``orthoreg.cli.main(argv)`` in-process; SystemExit (argparse) becomes a return code."""
    from orthoreg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return CliResult(int(code), out.getvalue(), err.getvalue())


def python_env() -> dict[str, str]:
    """Environment for ``python -m orthoreg`` subprocesses: the repo importable, 1 thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable
