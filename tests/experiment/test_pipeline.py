"""The experiment pipeline end to end on a tiny, asset-free configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.errors import ConfigError, RunLocked
from orthoreg.experiment import Experiment, from_mapping, load_config
from orthoreg.experiment.workspace import Workspace

TINY = {
    "name": "tiny",
    "model": "tiny_cnn",
    "tasks": ["synthetic_blobs", "synthetic_blobs_b"],
    "control": "synthetic_blobs_c",
    "data": {"max_train": 64, "max_val": 16, "max_test": 32, "shots": 2, "resolution": 16},
    "paradigms": {"full": {"lr": 3e-3}, "lora": {"lr": 1e-2, "targets": r"features\.\d\.0", "rank": 2,
                                                   "alpha": 2}},
    "train": {"steps": 4, "batch_size": 16, "warmup_steps": 1},
    "selection": {"lambdas": [1.0], "lr_multipliers": [1.0]},
    "alphas": {"num": 5},
}

RUN_KEYS = {"model", "paradigm", "lambda", "seed", "pretrained_acc", "finetuned_acc",
            "addition", "negation", "cosine_mean"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    results = Experiment(from_mapping(TINY), out, log=lambda _: None, progress=False).run()
    return out, results


def test_outputs_and_schema(finished: tuple[Path, dict]) -> None:
    out, _ = finished
    for name in ("results.json", "report.md", "config.json", "bars.png", "alpha_curves.png",
                 "cosines.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] and len(on_disk["runs"]) == 4  # 2 paradigms × (baseline, orthoreg)
    for run in on_disk["runs"]:
        assert RUN_KEYS <= run.keys()
        assert {"alpha", "abs", "norm", "per_task"} <= run["addition"].keys()
        assert {"threshold", "target", "control"} <= run["negation"].keys()
        assert 0.0 <= run["addition"]["alpha"] <= 1.0
        assert set(run["addition"]["per_task"]) == set(TINY["tasks"])
    variants = {(r["paradigm"], r["variant"], r["lambda"]) for r in on_disk["runs"]}
    assert ("full", "baseline", 0.0) in variants and ("full", "orthoreg", 1.0) in variants
    for key in ("git_commit", "versions", "config"):
        assert key in on_disk
    report = (out / "report.md").read_text()
    assert "| full | baseline |" in report and "Verdict" in report


def test_rerun_reuses_every_stage(finished: tuple[Path, dict], monkeypatch) -> None:
    out, results = finished
    stage_files = sorted(out.glob("stages/*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in stage_files}
    import orthoreg.experiment.pipeline as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fine-tune was recomputed")

    monkeypatch.setattr(pipeline, "finetune", no_training)
    again = Experiment(from_mapping(TINY), out, log=lambda _: None, progress=False).run()
    assert [r["addition"] for r in again["runs"]] == [r["addition"] for r in results["runs"]]
    assert {p: p.stat().st_mtime_ns for p in stage_files} == before


def test_second_process_is_refused(tmp_path: Path) -> None:
    holder = Workspace(tmp_path)
    holder.acquire()
    try:
        (tmp_path / ".orthoreg.lock").write_text("1")  # pid 1 is alive and not us
        with pytest.raises(RunLocked):
            Workspace(tmp_path).acquire()
    finally:
        holder.release()


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / ".orthoreg.lock").write_text("999999999")
    with Workspace(tmp_path):
        assert (tmp_path / ".orthoreg.lock").read_text() != "999999999"


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"steps": "ten"}}, "train.steps"),
        ({"selection": {"lambdas": [-1.0], "lr_multipliers": [1.0]}}, "selection.lambdas"),
        ({"alphas": {"num": 0}}, "alphas.num"),
        ({"paradigms": {"fool": {}}}, "paradigms.fool"),
        ({"selection": {"lambdas": [1.0, 2.0], "lr_multipliers": [1.0]}}, "lr_multipliers"),
    ],
)
def test_bad_configs_name_the_key(patch: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        from_mapping({**TINY, **patch})


def test_builtin_configs_validate() -> None:
    from orthoreg.cli.commands import builtin_config

    for name in ("embedded", "quick"):
        config = load_config(builtin_config(name))
        assert set(config.paradigms) == {"full", "linear", "partial", "lora"}
