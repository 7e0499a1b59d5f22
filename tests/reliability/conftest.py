"""Fixtures of the reliability tests.

``tiny_run`` is one real experiment (``tiny_cnn`` on ``synthetic_blobs``, a few steps, no
assets needed) run once per session; tests that tamper with a run copy it first.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_helpers import HOSTILE, TINY_CONFIG, Hostile

from orthoreg.experiment.config import from_mapping
from orthoreg.experiment.pipeline import Experiment


@pytest.fixture(params=HOSTILE, ids=lambda h: h.kind)
def hostile(request: pytest.FixtureRequest) -> Hostile:
    return request.param


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished experiment directory (do not modify: copy it with ``copy_run``)."""
    out = tmp_path_factory.mktemp("tiny_run") / "out"
    Experiment(from_mapping(TINY_CONFIG), out, log=lambda _: None, progress=False).run()
    return out


@pytest.fixture
def copy_run(tiny_run: Path, tmp_path: Path) -> Callable[[], Path]:
    def copy() -> Path:
        target = tmp_path / "run"
        shutil.copytree(tiny_run, target)
        return target

    return copy
