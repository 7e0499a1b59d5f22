"""Seeds run apart and joined: `--selection-from` pins seed 0's choices, `combine` joins."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from orthoreg.cli import main
from orthoreg.errors import ConfigError, OrthoRegError
from orthoreg.experiment import Experiment, from_mapping
from orthoreg.experiment.combine import combine
from orthoreg.experiment.pipeline import pin_selection

from .test_pipeline import TINY as BASE

#: the pipeline tests' tiny config, one paradigm, two candidates per variant (a real choice)
TINY = {**BASE, "paradigms": {"full": {"lr": 3e-3}},
        "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1},
        "selection": {"lambdas": [1.0, 10.0], "lr_multipliers": [1.0, 3.0]},
        "alphas": {"num": 3}, "seeds": [0]}


def _run(out: Path, seeds: list[int], pinned: dict | None = None) -> dict:
    config = from_mapping({**TINY, "seeds": seeds})
    return Experiment(config, out, log=lambda _: None, progress=False, pinned=pinned).run()


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    first, second = tmp_path_factory.mktemp("seed0"), tmp_path_factory.mktemp("seed1")
    chosen = _run(first, [0])
    pinned = _run(second, [1], pinned=chosen)
    return first, second, chosen, pinned


def test_a_pinned_run_trains_only_the_chosen_candidates(split) -> None:
    first, second, chosen, pinned = split
    assert len(list(first.glob("stages/finetune-*"))) == 8  # 4 candidates × 2 tasks
    assert len(list(second.glob("stages/finetune-*"))) == 4  # 2 chosen × 2 tasks
    for variant, choice in pinned["selection"]["full"].items():
        origin = chosen["selection"]["full"][variant]
        assert (choice["lr"], choice["lambda"]) == (origin["lr"], origin["lambda"])
        assert choice["pinned_from"]["seeds"] == [0]
    assert {r["seed"] for r in pinned["runs"]} == {1}
    assert "pinned from run 'tiny'" in (second / "report.md").read_text()


def test_combine_joins_seeds_into_one_report(split, tmp_path: Path) -> None:
    first, second, chosen, _ = split
    joined = combine(tmp_path / "all", [first, second])
    assert [r["seed"] for r in joined["runs"] if r["variant"] == "baseline"] == [0, 1]
    row = next(r for r in joined["summary"] if r["variant"] == "orthoreg")
    assert row["seeds"] == 2
    values = [r["addition"]["abs"] for r in joined["runs"] if r["variant"] == "orthoreg"]
    assert row["addition_abs"] == pytest.approx(sum(values) / 2)
    assert "pinned_from" not in joined["selection"]["full"]["baseline"]  # the run that chose
    assert joined["config"]["seeds"] == [0, 1]
    report = (tmp_path / "all" / "report.md").read_text()
    assert "paired over 2 seeds" in report
    on_disk = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [s["seeds"] for s in on_disk["sources"]] == [[0], [1]]
    assert on_disk["name"] == joined["name"] == chosen["name"]  # the first run's by default
    named = combine(tmp_path / "named", [first, second], name="joined-benchmark")
    assert named["name"] == named["config"]["name"] == "joined-benchmark"
    assert (tmp_path / "named" / "report.md").read_text().startswith(
        "# orthoreg report — joined-benchmark")


def test_combine_refuses_a_seed_twice_and_a_different_config(split, tmp_path: Path) -> None:
    first, _, chosen, _ = split
    with pytest.raises(OrthoRegError, match="seed 0 is also in"):
        combine(tmp_path / "twice", [first, first])
    other = copy.deepcopy(chosen)
    other["config"]["train"]["steps"] = 99
    other["runs"] = [{**r, "seed": 5} for r in other["runs"]]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    with pytest.raises(OrthoRegError, match=r"'train\.steps' differs"):
        combine(tmp_path / "bad", [first, path])
    assert not (tmp_path / "bad" / "results.json").exists()


def test_pinning_a_choice_off_this_grid_names_it(split) -> None:
    _, _, chosen, _ = split
    config = from_mapping({**TINY, "selection": {"lambdas": [3.0, 30.0],
                                                 "lr_multipliers": [1.0, 3.0]}})
    with pytest.raises(ConfigError, match=r"full / orthoreg .* not on this config's grid"):
        pin_selection(config, chosen)
    with pytest.raises(ConfigError, match="chose nothing for paradigm 'lora'"):
        pin_selection(from_mapping({**TINY, "paradigms": {"lora": {"lr": 1e-2}}}), chosen)


def test_cli_selection_from_and_combine_errors(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--selection-from", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "out"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1
