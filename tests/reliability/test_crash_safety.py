"""Crash-safe, resumable runs: no half-written file, no lost or recomputed work.

* every write in the library goes through the atomic writer (static scan), and the writer
  leaves the old file intact when it fails at its worst moment;
* a fine-tuning subprocess SIGKILLed three times at random moments resumes and ends with
  the task vector of an uninterrupted run, bit for bit;
* rerunning a finished experiment recomputes and rewrites nothing.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import itertools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import PYTHON, REPO, TINY_CONFIG, python_env

from orthoreg.experiment import pipeline
from orthoreg.experiment.config import from_mapping
from orthoreg.experiment.workspace import Workspace
from orthoreg.taskvector import TaskVector
from orthoreg.training import CHECKPOINT
from orthoreg.utils import io as orthoreg_io

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------- static scan
#: calls that write a file; each must be the atomic writer or be listed in ALLOWED
WRITERS = ("write_text", "write_bytes", "save_file", "torch.save", "np.save", "np.savez",
           "np.savez_compressed", "savefig", "json.dump", "to_csv", "shutil.copy",
           "shutil.copyfile", "shutil.copy2", "os.fdopen", "os.write")

#: (file, call) -> why it is not a write to a final path
ALLOWED = {
    ("orthoreg/utils/io.py", "os.fdopen"): "the atomic writer's own temporary file",
    ("orthoreg/zoo/assets.py", "np.savez"): "into a BytesIO, then atomic_write_bytes",
    ("orthoreg/experiment/workspace.py", "os.write"): "the lock file's pid (not a result)",
    ("orthoreg/experiment/workspace.py", "os.fdopen"): "the lock file's pid (not a result)",
    ("orthoreg/bench/search.py", "save_file"): "a scratch file in a TemporaryDirectory",
    ("orthoreg/diagnostics/plots.py", "savefig"): "into a BytesIO, then atomic_write_bytes",
    ("orthoreg/experiment/report.py", "savefig"): "into a BytesIO, then atomic_write_bytes",
    ("orthoreg/clip/data.py", "np.save"): "a temporary name, then os.replace",
}


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _open_mode(call: ast.Call) -> str:
    mode = call.args[1] if len(call.args) > 1 else next(
        (k.value for k in call.keywords if k.arg == "mode"), None)
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"


def test_library_writes_only_through_the_atomic_writer():
    offenders = []
    for path in sorted((REPO / "orthoreg").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node.func)
            short = name.rsplit(".", 1)[-1]
            if name == "open" or (name.endswith(".open") and name != "os.open"):
                if any(c in _open_mode(node) for c in "wax+"):
                    offenders.append(f"{relative}:{node.lineno} {name}")
                continue
            matched = next((w for w in WRITERS if name == w or name.endswith("." + w)
                            or ("." not in w and short == w)), None)
            if matched and (relative, matched) not in ALLOWED:
                offenders.append(f"{relative}:{node.lineno} {name}")
    assert offenders == [], "write these through orthoreg.utils.io.atomic_write_*"


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path: Path, monkeypatch,
                                                          fail_at: str):
    """Die inside the write (after the data, before the rename): old bytes stay."""
    target = tmp_path / "vector.safetensors"
    TaskVector({"w": torch.ones(3)}).save(target)
    before = target.read_bytes()

    def die(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(orthoreg_io.os, fail_at, die)
    with pytest.raises(OSError, match="simulated crash"):
        TaskVector({"w": torch.zeros(3)}).save(target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vector.safetensors"]


# ------------------------------------------------------------- SIGKILL and resume
def _load_script():
    spec = importlib.util.spec_from_file_location("killable_finetune",
                                                  HERE / "killable_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(workdir: Path, vector: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, str(HERE / "killable_finetune.py"), str(workdir),
                             str(vector)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=python_env(), cwd=REPO)


def test_sigkilled_finetune_resumes_bit_identical(tmp_path: Path):
    """Start, wait for two steps, sleep 0-0.3 s, SIGKILL; three times; then finish.

    ``step N`` is printed just before step N's checkpoint is written, so the second line
    proves this attempt wrote one; the kill then lands anywhere in the steps that follow
    (inside a forward pass, an optimizer step or a checkpoint write).
    """
    script = _load_script()
    rng = random.Random(int(os.environ.get("ORTHOREG_KILL_SEED", time.time_ns())))
    workdir, vector_path = tmp_path / "run", tmp_path / "vector.safetensors"
    first_steps = []
    for _ in range(3):
        process = _start(workdir, vector_path)
        lines = [process.stdout.readline() for _ in range(2)]
        if not all(line.startswith("step ") for line in lines):
            process.kill()
            pytest.fail(f"the run did not start: {lines!r} {process.stderr.read()[-2000:]}")
        first_steps.append(int(lines[0].split()[1]))
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL
    final = subprocess.run([PYTHON, str(HERE / "killable_finetune.py"), str(workdir),
                            str(vector_path)], capture_output=True, text=True,
                           env=python_env(), cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed_from = int(final.stdout.strip().splitlines()[-1].split("=")[1])
    # every restart picked up after the checkpoint its predecessor wrote: no work lost
    starts = [*first_steps, resumed_from + 1]
    assert starts[0] == 1
    assert all(later > earlier for earlier, later in itertools.pairwise(starts)), starts

    expected, _ = script.train(tmp_path / "reference")
    resumed = TaskVector.load(vector_path)
    assert list(resumed) == list(expected)
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert not list(workdir.glob("*.tmp")), "orphaned temporary files after resume"


def test_resume_sweeps_orphaned_temporary_files(tmp_path: Path):
    """A kill inside a checkpoint write leaves ``.checkpoint.safetensors.*.tmp``; the next
    run of the same trainer removes it (it can be as large as the model)."""
    script = _load_script()
    orphan = tmp_path / "run" / f".{CHECKPOINT}.abc123.tmp"
    orphan.parent.mkdir()
    orphan.write_bytes(b"\0" * 1024)
    script.train(tmp_path / "run")
    assert not orphan.exists()
    assert (tmp_path / "run" / CHECKPOINT).is_file()


# ---------------------------------------------------------------- finished stages
def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and "stages" in p.parts}


def test_rerun_never_recomputes_or_rewrites_a_finished_stage(copy_run, monkeypatch):
    run = copy_run()
    before = _snapshot(run)
    assert any(k.endswith("vector.safetensors") for k in before)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fine-tuning stage was recomputed")

    monkeypatch.setattr(pipeline, "finetune", no_training)
    results = pipeline.Experiment(from_mapping(TINY_CONFIG), run, log=lambda _: None,
                                  progress=False).run()
    assert _snapshot(run) == before
    assert results["runs"] and (run / "results.json").is_file()


def test_unreadable_stage_record_is_redone_not_trusted(tmp_path: Path):
    """A stage is done only when its result.json parses as a JSON object."""
    workspace = Workspace(tmp_path)
    for garbage in (b"\xff\xfe\x00garbage", b'{"truncated": ', b"[1, 2, 3]", b"null"):
        (workspace.stage_dir("finetune-x") / "result.json").write_bytes(garbage)
        assert workspace.done("finetune-x") is None, garbage
    workspace.finish("finetune-x", {"val_acc": 0.5})
    assert workspace.done("finetune-x") == {"val_acc": 0.5}
    assert json.loads((tmp_path / "stages/finetune-x/result.json").read_text())["val_acc"] == 0.5
