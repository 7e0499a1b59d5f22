"""`orthoreg gather`: finished stages of several runs merged into one output directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.cli import main
from orthoreg.errors import OrthoRegError
from orthoreg.experiment.workspace import Workspace, gather


def _stage(root: Path, key: str, result: dict | None, payload: bytes = b"tensor") -> Path:
    folder = root / "stages" / key
    folder.mkdir(parents=True)
    (folder / "vector.safetensors").write_bytes(payload)
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))
    return folder


def test_gathers_finished_stages_and_skips_unfinished(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _stage(a, "finetune-1", {"val_acc": 0.5})
    _stage(a, "head-1", {"n": 1})
    _stage(b, "head-1", {"n": 1})  # the same finished stage in both: taken once
    _stage(b, "finetune-2", {"val_acc": 0.7}, b"other")
    _stage(b, "finetune-3", None)  # still running there

    report = gather(out, [a, b])

    assert (report.added, report.present, report.unfinished) == (3, 0, 1)
    ws = Workspace(out)
    assert ws.done("finetune-1") == {"val_acc": 0.5}
    assert ws.done("finetune-2") == {"val_acc": 0.7}
    assert ws.done("finetune-3") is None
    assert not (out / "stages" / "finetune-3").exists()
    copied = out / "stages" / "finetune-2" / "vector.safetensors"
    assert copied.read_bytes() == b"other"
    assert copied.stat().st_ino == (b / "stages" / "finetune-2" / "vector.safetensors").stat().st_ino
    again = gather(out, [a, b])
    assert (again.added, again.present) == (0, 3)


def test_conflicting_results_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _stage(a, "finetune-0", {"val_acc": 0.1})
    _stage(a, "finetune-1", {"val_acc": 0.5})
    _stage(b, "finetune-1", {"val_acc": 0.6})
    with pytest.raises(OrthoRegError, match="finetune-1"):
        gather(out, [a, b])
    assert not (out / "stages").exists()


def test_a_conflict_with_the_destination_is_refused(tmp_path: Path) -> None:
    a, out = tmp_path / "a", tmp_path / "out"
    _stage(a, "finetune-1", {"val_acc": 0.5})
    _stage(out, "finetune-1", {"val_acc": 0.9})
    with pytest.raises(OrthoRegError, match="different results"):
        gather(out, [a])
    assert Workspace(out).done("finetune-1") == {"val_acc": 0.9}


def test_an_unfinished_destination_stage_is_replaced(tmp_path: Path) -> None:
    a, out = tmp_path / "a", tmp_path / "out"
    _stage(a, "finetune-1", {"val_acc": 0.5}, b"new")
    _stage(out, "finetune-1", None, b"half-written")
    assert gather(out, [a]).added == 1
    assert (out / "stages" / "finetune-1" / "vector.safetensors").read_bytes() == b"new"


def test_cli_reports_counts_and_rejects_a_non_run_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a"
    _stage(a, "finetune-1", {"val_acc": 0.5})
    assert main(["gather", str(tmp_path / "out"), str(a)]) == 0
    assert "1 stages added" in capsys.readouterr().out
    assert main(["gather", str(tmp_path / "out"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "no stages/" in err and len(err.strip().splitlines()) == 1
