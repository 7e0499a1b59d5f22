"""`orthoreg demo --quick` end to end on the real embedded assets (CI's slow test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orthoreg.zoo import assets

pytestmark = [pytest.mark.slow, pytest.mark.assets]


def test_quick_demo_runs_and_reports(tmp_path: Path) -> None:
    needed = ("mobilenet_v2", "mnist", "fashion_mnist")
    if not all(assets.is_available(name) for name in needed):
        pytest.skip("embedded assets missing: run `python -m orthoreg.zoo.assets fetch`")
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "orthoreg", "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    paradigms = {run["paradigm"] for run in results["runs"]}
    assert paradigms == {"full", "linear", "partial", "lora"}
    assert all(0.0 <= run["addition"]["abs"] <= 1.0 for run in results["runs"])
    assert (out / "report.md").read_text().count("| baseline |") == 4
    # a rerun with the same config reuses every stage and is fast
    again = subprocess.run(
        [sys.executable, "-m", "orthoreg", "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fine-tune " not in again.stdout
