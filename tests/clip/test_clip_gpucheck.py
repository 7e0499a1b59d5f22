"""scripts/gpu_check.sh on the CPU (--dry-run): the script a GPU machine will run, checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_open_clip

pytestmark = needs_open_clip
ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_in_process_reports_every_configuration(
        capsys: pytest.CaptureFixture[str]) -> None:
    from orthoreg.clip.gpucheck import main

    assert main(["--dry-run", "--no-torchrun", "--paradigms", "full,lora"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["dry_run"] and report["device"] == "cpu"
    combos = {(r["paradigm"], r["precision"], r["lam"] > 0) for r in report["runs"]}
    assert combos == {(p, q, on) for p in ("full", "lora") for q in ("fp32", "bf16")
                      for on in (True, False)}
    assert all(r["finite"] and r["steps"] == 2 and r["seconds_per_step"] > 0
               for r in report["runs"])
    # OrthoReg's λ of the paper, and R(0) = Σ √n > 0: the penalty is in the loss at step 1
    with_reg = [r for r in report["runs"] if r["lam"] > 0]
    assert {r["lam"] for r in with_reg} == {10.0, 1.0}
    assert set(report["penalty_step_time_ratio"]) == {"full/fp32", "full/bf16", "lora/fp32",
                                                      "lora/bf16"}
    assert report["eval_images_per_second"] > 0 and "torchrun" not in report


def test_no_cuda_is_a_clear_failure(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from orthoreg.clip.gpucheck import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--no-torchrun"]) == 1
    assert "CUDA is not available" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_script_dry_run_with_torchrun(tmp_path: Path) -> None:
    """The script end to end: 4 paradigms × fp32/bf16 × {OrthoReg, baseline}, torchrun (gloo)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one JSON line of figures
    report = json.loads(lines[0])
    assert report == json.loads(out.read_text())
    assert report["ok"] and len(report["runs"]) == 4 * 2 * 2
    assert {r["paradigm"] for r in report["runs"]} == {"full", "linear", "partial", "lora"}
    assert report["torchrun"]["ok"] and report["torchrun"]["backend"] == "gloo"
    assert report["torchrun"]["world_size"] == 1 and report["torchrun"]["all_reduce"] == 1.0


def test_cli_gpu_check_takes_the_scripts_options(capsys: pytest.CaptureFixture[str]) -> None:
    from orthoreg.cli import main

    assert main(["clip", "gpu-check", "--dry-run", "--no-torchrun", "--paradigms",
                 "partial"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and {r["paradigm"] for r in report["runs"]} == {"partial"}
