"""Smoke test of ``python -m orthoreg.bench search`` at a toy size (timings are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.bench.__main__ import BENCHMARKS, main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def test_search_benchmark_runs_and_writes_figures(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "search.json"
    code = main(["search", "--images", "4", "--linear-images", "2", "--size", "32",
                 "--alphas", "3", "--batch-size", "2", "--repeats", "1", "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {"linear_per_alpha_over_grid", "reload_over_inplace",
                                      "inplace_over_bare"}
    assert figures["linear_grid_agrees_with_per_alpha"].startswith("3/3")
    assert "in-place search" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "search" in BENCHMARKS
    assert main(["nope"]) == 2
    assert "usage" in capsys.readouterr().err
