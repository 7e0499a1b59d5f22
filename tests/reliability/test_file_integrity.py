"""Damaged or non-finite tensor files are refused, naming the file and the tensor.

Every tensor file the project writes records a sha256 per tensor and of its JSON record;
loading verifies them, so bytes overwritten inside a file that still parses (which
safetensors cannot notice) are an error, not a NaN task vector that ``orthoreg info`` and
``orthoreg merge`` pass on. Files without hashes (older, or from elsewhere) still load,
checked for NaN/inf. Nothing non-finite is ever written. Written files get the umask's
mode, not mkstemp's 0600.
"""

from __future__ import annotations

import ast
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from reliability_helpers import REPO, run_cli
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.heads import ZeroShotHead
from orthoreg.paradigms import get_paradigm
from orthoreg.taskvector import TaskVector
from orthoreg.training import CHECKPOINT, TrainConfig, Trainer, finetune
from orthoreg.utils.io import (
    HASH_KEY,
    METADATA_KEY,
    NonFiniteTensorError,
    OrthoRegFileError,
    atomic_write_bytes,
    read_tensors,
    save_tensors,
)
from orthoreg.zoo.vision.heads import Head

META = {"base_fingerprint": "base-A", "paradigm": "full"}


def header(path: Path) -> tuple[int, dict]:
    """(length, parsed JSON) of a safetensors file's header."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length])


def overwrite_tensor_bytes(path: Path, name: str, replacement: bytes, at: int = 4) -> None:
    """Overwrite bytes inside tensor ``name``'s data, leaving the header (and parsing) intact."""
    length, head = header(path)
    start = 8 + length + head[name]["data_offsets"][0] + at
    data = bytearray(path.read_bytes())
    data[start : start + len(replacement)] = replacement
    path.write_bytes(bytes(data))


@pytest.fixture
def vector_file(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {"layer.weight": torch.randn(8, 8, generator=generator),
               "layer.bias": torch.randn(8, generator=generator)}
    return TaskVector(tensors, META).save(tmp_path / "tau.safetensors")


# ------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("replacement", [b"\xff" * 8, b"\x00" * 8, b"\x00\x00\x80\x3f" * 2],
                         ids=["nan-bytes", "zero-bytes", "ones"])
def test_overwritten_tensor_bytes_are_refused_naming_file_and_tensor(vector_file: Path,
                                                                     replacement: bytes):
    """Finite replacements too (zeros, 1.0): only the hash can tell these from real data."""
    overwrite_tensor_bytes(vector_file, "layer.weight", replacement)
    with pytest.raises(OrthoRegFileError) as caught:
        TaskVector.load(vector_file)
    message = str(caught.value)
    assert str(vector_file) in message and "'layer.weight'" in message and "\n" not in message


def test_a_tampered_metadata_record_is_refused(vector_file: Path):
    """Same length, still valid JSON: only the record's hash notices the changed paradigm."""
    data = vector_file.read_bytes()
    assert data.count(b'\\"paradigm\\": \\"full\\"') == 1
    vector_file.write_bytes(data.replace(b'\\"paradigm\\": \\"full\\"',
                                         b'\\"paradigm\\": \\"lora\\"'))
    with pytest.raises(OrthoRegFileError, match="metadata record"):
        TaskVector.load(vector_file)


def test_cli_info_and_merge_refuse_a_damaged_vector(vector_file: Path, tmp_path: Path):
    """The issue's case: exit 2, one line naming file and tensor, no output, nothing written."""
    good = TaskVector({k: v.clone() for k, v in TaskVector.load(vector_file).items()}, META)
    good_file = good.save(tmp_path / "good.safetensors")
    overwrite_tensor_bytes(vector_file, "layer.bias", b"\xff" * 8)
    info = run_cli(["info", str(good_file), str(vector_file)])
    assert info.code == 2 and info.out == "" and "Traceback" not in info.err
    assert info.err.count("\n") == 1 and "'layer.bias'" in info.err and str(vector_file) in info.err
    out = tmp_path / "merged.safetensors"
    merge = run_cli(["merge", "task_arithmetic", str(good_file), str(vector_file),
                     "--out", str(out)])
    assert merge.code == 2 and "'layer.bias'" in merge.err and merge.err.count("\n") == 1
    assert not out.exists()


# --------------------------------------------------------------- files without hashes
def test_an_unhashed_finite_file_still_loads(tmp_path: Path):
    """Files from elsewhere (plain safetensors) or from before the hash keep working."""
    path = tmp_path / "external.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path), metadata={METADATA_KEY: json.dumps(META)})
    assert HASH_KEY not in header(path)[1]["__metadata__"]
    vector = TaskVector.load(path)
    assert torch.equal(vector["w"], torch.ones(2, 2)) and vector.metadata == META


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_unhashed_non_finite_file_is_refused_naming_the_tensor(tmp_path: Path, bad: float,
                                                                   dtype: torch.dtype):
    path = tmp_path / "external.safetensors"
    poisoned = torch.zeros(300, dtype=dtype)
    poisoned[257] = bad  # not the first element: the scan must look at every value
    save_file({"fine": torch.ones(3), "poisoned": poisoned}, str(path))
    with pytest.raises(NonFiniteTensorError) as caught:
        read_tensors(path)
    assert "'poisoned'" in str(caught.value) and str(path) in str(caught.value)
    run = run_cli(["info", str(path)])
    assert run.code == 2 and run.out == "" and "'poisoned'" in run.err


# ------------------------------------------------------------------ writing
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_never_written(tmp_path: Path, bad: float):
    """The old file stays, no temporary file is left, and the error names file and tensor."""
    path = save_tensors(tmp_path / "v.safetensors", {"w": torch.ones(4)})
    before = path.read_bytes()
    with pytest.raises(NonFiniteTensorError) as caught:
        save_tensors(path, {"ok": torch.ones(2), "w": torch.tensor([1.0, bad, 2.0])})
    assert "'w'" in str(caught.value) and str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_integer_and_empty_tensors_are_not_checked_for_finiteness(tmp_path: Path):
    tensors = {"ints": torch.arange(5), "flags": torch.tensor([True, False]),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    path = save_tensors(tmp_path / "v.safetensors", tensors)
    loaded, _ = read_tensors(path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name


def test_cli_merge_refuses_to_write_a_non_finite_merge(tmp_path: Path):
    """Two finite float32 vectors whose sum overflows to inf: exit 2, nothing written."""
    big = torch.tensor([3e38, 1.0])
    paths = [TaskVector({"w": big.clone()}, META).save(tmp_path / f"{i}.safetensors")
             for i in range(2)]
    out = tmp_path / "merged.safetensors"
    result = run_cli(["merge", "task_arithmetic", *map(str, paths), "--out", str(out)])
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and "'w'" in result.err and str(out) in result.err
    assert result.out == "" and not out.exists()


def tiny_trainer_parts() -> tuple[nn.Module, nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = get_paradigm("full").prepare(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)))
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 3, 2, 2, generator=generator),
                         torch.randint(0, 3, (16,), generator=generator))
    return model, nn.Linear(6, 3), data


TRAIN = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, lam=0.1,
                    checkpoint_every=2, progress=False)


def test_every_tensor_writer_records_hashes(tmp_path: Path):
    """Task vectors, both head kinds and training checkpoints all go through save_tensors."""
    model, head, data = tiny_trainer_parts()
    finetune(model, head, data, TRAIN, tmp_path / "run")
    files = {
        "vector": TaskVector({"w": torch.ones(2)}, META).save(tmp_path / "v.safetensors"),
        "zero-shot head": ZeroShotHead(torch.randn(3, 4), 100.0).save(tmp_path / "z.safetensors"),
        "prototype head": Head(torch.randn(3, 4), torch.zeros(4), 10.0,
                               torch.arange(3)).save(tmp_path / "h.safetensors"),
        "checkpoint": tmp_path / "run" / CHECKPOINT,
    }
    for kind, path in files.items():
        _, head_json = header(path)
        recorded = json.loads(head_json["__metadata__"][HASH_KEY])
        names = {name for name in head_json if name != "__metadata__"}
        assert set(recorded["tensors"]) == names, kind
        read_tensors(path)  # and they verify


def test_resume_verifies_the_checkpoint(tmp_path: Path):
    """A checkpoint is verified like any file: damaged weights stop the resume, by name."""
    model, head, data = tiny_trainer_parts()
    finetune(model, head, data, TRAIN, tmp_path)
    path = tmp_path / CHECKPOINT
    name = next(n for n in header(path)[1] if n.startswith("model."))
    overwrite_tensor_bytes(path, name, b"\x00" * 8, at=0)
    model, head, data = tiny_trainer_parts()
    with pytest.raises(OrthoRegFileError) as caught:
        Trainer(model, head, data, TRAIN, tmp_path).try_resume()
    assert repr(name) in str(caught.value) and str(path) in str(caught.value)


def test_tensor_files_are_written_only_by_save_tensors():
    """No module but utils/io.py imports a safetensors writer (so none skips the hashes).

    The benchmark's θ0 scratch file in a TemporaryDirectory is the one exception.
    """
    allowed = {"orthoreg/utils/io.py", "orthoreg/bench/search.py"}
    writers = {"save", "save_file"}
    offenders = []
    for path in sorted((REPO / "orthoreg").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safetensors")
                    and any(alias.name in writers for alias in node.names)
                    and relative not in allowed):
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == [], "write tensor files with orthoreg.utils.io.save_tensors"


# ------------------------------------------------------------------- file modes
@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask-{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_written_files_get_the_umask_mode_not_0600(tmp_path: Path, umask: int):
    """0644 under umask 022, 0600 under 077: what any program's new file would get."""
    expected = 0o666 & ~umask
    written = [atomic_write_bytes(tmp_path / "report.md", b"x"),
               save_tensors(tmp_path / "v.safetensors", {"w": torch.ones(2)}),
               atomic_write_bytes(tmp_path / "report.md", b"rewritten")]  # a replacement too
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "v.safetensors"]
