"""``orthoreg diagnose --run DIR`` on a real (tiny) experiment directory.

The run is made by :class:`orthoreg.experiment.Experiment` itself: model ``tiny_cnn`` and
two seeded variants of the asset-free ``synthetic_blobs`` task (registered for this module
only), ``synthetic_blobs`` as the negation control, paradigms ``full`` and ``linear``.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from orthoreg.cli import main
from orthoreg.experiment import Experiment, from_mapping
from orthoreg.experiment.diagnose import (
    BEGIN,
    END,
    DiagnoseOptions,
    diagnose_run,
    find_vector,
    finetune_records,
)
from orthoreg.zoo.vision import datasets

TASKS = ("blobs_a", "blobs_b")
CONFIG = {
    "name": "tiny-diagnose", "model": "tiny_cnn", "tasks": list(TASKS),
    "control": "synthetic_blobs",
    "data": {"max_train": 48, "max_val": 12, "max_test": 24, "shots": 2, "resolution": 16},
    "paradigms": {"full": {"lr": 1e-2}, "linear": {"lr": 1e-2}},
    "train": {"steps": 3, "batch_size": 16, "warmup_steps": 0},
    "selection": {"lambdas": [1.0], "lr_multipliers": [1.0]},
    "alphas": {"num": 3}, "negation_thresholds": [0.5],
}
FAST = ["--grid", "5", "--examples", "16", "--tfs-examples", "8"]


@pytest.fixture(scope="module")
def blob_tasks() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, seed in zip(TASKS, (11, 22)):
            loader = functools.cache(functools.partial(datasets.load_synthetic_blobs, seed=seed))
            patch.setitem(datasets.TASKS, name, loader)
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, blob_tasks: None) -> Path:
    out = tmp_path_factory.mktemp("run")
    Experiment(from_mapping(CONFIG), out, log=lambda _: None, progress=False).run()
    return out


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy, so each test sees the run as the experiment left it."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_cli_writes_json_plots_markdown_and_report_section(run_dir: Path, capsys) -> None:
    assert main(["diagnose", "--run", str(run_dir), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "mean ξ in disk" in printed and "torch thread" in printed
    document = json.loads((run_dir / "diagnostics.json").read_text())
    assert document["pairs"] == [list(TASKS)]
    assert set(document["paradigms"]) == {"full", "linear"}
    for paradigm, sections in document["paradigms"].items():
        maps = sections["disentanglement"]["blobs_a|blobs_b"]
        assert set(maps) == {"baseline", "orthoreg"}
        for result in maps.values():
            assert len(result["xi"]) == 5 and result["xi"][2][2] == 0.0  # (0, 0) is θ0
            assert result["seconds"] > 0 and result["examples"] == [16, 16]
        assert set(sections["orthogonality"]["cosines"]) == {"baseline", "orthoreg"}
        tfs = sections["specialization"]
        assert "θ0" in tfs and (paradigm == "linear") == ("baseline θ0+τ" not in tfs)
    for name in document["files"]:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert any(name.startswith("diag_xi_full_") for name in document["files"])
    markdown = (run_dir / "diagnostics.md").read_text()
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# orthoreg report")  # the original report is kept
    assert report.count(BEGIN) == 1 and report.count(END) == 1 and "## Diagnostics" in report
    for name in document["files"]:
        assert f"({name})" in markdown and f"({name})" in report


def test_rerun_replaces_the_report_section(run_dir: Path) -> None:
    options = DiagnoseOptions(points=3, examples=8, tfs_examples=8, paradigms=("full",),
                              sections=("disentanglement",))
    diagnose_run(run_dir, options, log=lambda _: None)
    first = (run_dir / "report.md").read_text()
    diagnose_run(run_dir, options, log=lambda _: None)
    second = (run_dir / "report.md").read_text()
    assert second.count(BEGIN) == 1 and second.count("## Diagnostics") == 1
    assert len(second) == pytest.approx(len(first), abs=40)  # only timings may differ
    document = json.loads((run_dir / "diagnostics.json").read_text())
    assert list(document["paradigms"]) == ["full"]
    assert list(document["paradigms"]["full"]) == ["disentanglement"]


def test_vectors_come_from_the_matching_stages(run_dir: Path) -> None:
    """Each results.json run resolves to its own task's vector, of its paradigm and λ."""
    results = json.loads((run_dir / "results.json").read_text())
    records = finetune_records(run_dir)
    config = from_mapping(CONFIG)
    for run in results["runs"]:
        vector = find_vector(records, run, "blobs_b", config)
        assert vector.metadata["task"] == "blobs_b"
        assert vector.metadata["paradigm"] == run["paradigm"]
        assert vector.metadata["lambda"] == run["lambda"]


@pytest.mark.parametrize("args, message", [
    (["--paradigms", "lora"], "paradigm 'lora' is not in this run"),
    (["--seed", "7"], "seed 7"),
    (["--grid", "1"], "≥ 2 points"),
    (["--only", "vibes"], "unknown diagnostic"),
])
def test_user_errors_exit_2_with_one_line(run_dir: Path, capsys, args, message) -> None:
    assert main(["diagnose", "--run", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_not_a_run_directory(tmp_path: Path, capsys) -> None:
    assert main(["diagnose", "--run", str(tmp_path)]) == 2
    assert "results.json not found" in capsys.readouterr().err


def test_single_task_run_still_gets_per_vector_diagnostics(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    results["tasks"] = ["blobs_a"]
    (run_dir / "results.json").write_text(json.dumps(results))
    document = diagnose_run(run_dir, DiagnoseOptions(points=3, examples=8, tfs_examples=8,
                                                     paradigms=("full",)), log=lambda _: None)
    sections = document["paradigms"]["full"]
    assert document["pairs"] == [] and sections["disentanglement"] == {}
    assert set(sections["orthogonality"]["vectors"]["baseline"]) == {"blobs_a"}


def test_cli_defaults_are_the_library_defaults() -> None:
    from orthoreg.cli import diagnose as cli
    from orthoreg.diagnostics import disentanglement, specialization

    assert cli.DEFAULT_POINTS == disentanglement.DEFAULT_POINTS
    assert cli.DEFAULT_RANGE == disentanglement.DEFAULT_RANGE
    assert cli.DEFAULT_EXAMPLES == specialization.DEFAULT_EXAMPLES == DiagnoseOptions().examples
    assert cli.DEFAULT_SHARE == specialization.DEFAULT_SHARE == DiagnoseOptions().share
    assert set(cli.OBJECTIVE_NAMES) == set(specialization.OBJECTIVES)
    assert cli.OBJECTIVE_NAMES[0] == specialization.DEFAULT_OBJECTIVE
