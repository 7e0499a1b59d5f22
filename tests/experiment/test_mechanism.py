"""The mechanism sweep's pipeline: penalty forms as variants, norm-matched addition and ξ,
further merges, regime series, the vectors index and the overall progress line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from orthoreg.errors import ConfigError
from orthoreg.experiment import Experiment, from_mapping
from orthoreg.experiment.pipeline import (
    Candidate,
    candidates,
    regime_series,
    rescaled,
)
from orthoreg.experiment.progress import StageClock
from orthoreg.taskvector import TaskVector

from .test_pipeline import TINY

MECHANISM = {
    **TINY,
    "paradigms": {"full": {"lr": 3e-3}},
    "selection": {"lambdas": [1.0], "lr_multipliers": [1.0],
                  "forms": {"shape": [0.1], "growth": [1.0]}},
    "merges": ["ties"],
    "mechanism": {"norm_matched": True, "xi": True, "xi_points": 3, "xi_examples": 8},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mechanism")
    lines: list[str] = []
    results = Experiment(from_mapping(MECHANISM), out, log=lines.append, progress=False).run()
    return out, results | {"_log": lines}


def test_every_form_is_a_variant_with_its_own_grid() -> None:
    grid = candidates(from_mapping(MECHANISM), "full")
    assert [(c.variant, c.form, c.lam) for c in grid] == [
        ("baseline", "paper", 0.0), ("orthoreg", "paper", 1.0), ("shape", "shape", 0.1),
        ("growth", "growth", 1.0)]


def test_paper_candidates_keep_their_old_record() -> None:
    """Stage keys of runs made before penalty forms existed must stay valid."""
    assert Candidate("orthoreg", 1e-4, 1.0).to_dict() == {"variant": "orthoreg", "lr": 1e-4,
                                                          "lam": 1.0}
    assert Candidate("shape", 1e-4, 0.1, "shape").to_dict()["form"] == "shape"


@pytest.mark.parametrize(("forms", "message"), [
    ({"bogus": [1.0]}, "unknown penalty form 'bogus'"),
    ({"paper": [1.0]}, "unknown penalty form 'paper'"),
    ({"shape": [1.0, 2.0]}, "as large as selection.lambdas"),
])
def test_bad_forms_are_rejected_naming_the_key(forms: dict, message: str) -> None:
    raw = {**MECHANISM, "selection": {**MECHANISM["selection"], "forms": forms}}
    with pytest.raises(ConfigError, match=message) as error:
        from_mapping(raw)
    assert "selection.forms." in str(error.value)


def test_unknown_extra_merge_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"merges\[0\]"):
        from_mapping({**MECHANISM, "merges": ["nope"]})


def test_run_records_forms_regime_matched_and_merges(finished: tuple[Path, dict]) -> None:
    out, results = finished
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"baseline", "orthoreg", "shape", "growth"}
    assert runs["shape"]["form"] == "shape" and runs["orthoreg"]["form"] == "paper"
    for run in runs.values():
        assert set(run["regime"]) == set(MECHANISM["tasks"])
        for series in run["regime"].values():
            assert series[-1]["step"] == MECHANISM["train"]["steps"]
            assert series[-1]["sigma_max"] >= series[-1]["sigma_max_median"] > 0
        assert 0.0 <= run["xi"]["mean"] <= 2.0
        assert set(run["merges"]) == {"ties"}
        matched = run["norm_matched"]
        assert 0.0 <= matched["addition"]["abs"] <= 1.0
    # the baseline is the reference: it is not rescaled
    assert all(math.isclose(s, 1.0, rel_tol=1e-6)
               for s in runs["baseline"]["norm_matched"]["scale"].values())
    row = next(r for r in results["summary"] if r["variant"] == "shape")
    assert {"matched_addition_abs", "xi", "matched_xi", "sigma_max_final", "ties_abs"} <= set(row)
    report = (out / "report.md").read_text()
    assert "## Mechanism: structure or magnitude" in report
    assert (out / "regime_full.png").is_file()


def test_norm_matched_vectors_have_the_reference_norms(finished: tuple[Path, dict]) -> None:
    _out, results = finished
    for run in results["runs"]:
        base = next(r for r in results["runs"]
                    if r["variant"] == "baseline" and r["seed"] == run["seed"])
        for task, scale in run["norm_matched"]["scale"].items():
            assert math.isclose(scale * run["vector_norms"][task], base["vector_norms"][task],
                                rel_tol=1e-6)


def test_vectors_index_links_every_run_vector(finished: tuple[Path, dict]) -> None:
    out, results = finished
    for link, target in results["vectors_index"].items():
        path = out / link
        assert path.is_file() and os.path.samefile(path, out / target)
        assert TaskVector.load(path).norm() > 0
    expected = {f"vectors/full/{v}/{t}.safetensors" for v in ("baseline", "orthoreg", "shape",
                                                               "growth") for t in TINY["tasks"]}
    assert set(results["vectors_index"]) == expected
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"][0]["vectors"]


def test_progress_counts_the_plan_and_estimates(finished: tuple[Path, dict]) -> None:
    lines = finished[1]["_log"]
    positions = [line for line in lines if line.startswith("  [")]
    assert positions[0].strip().startswith("[1/8]")  # 4 variants × 2 tasks, one seed
    assert any("left]" in line for line in positions[1:])


def test_stage_clock_estimate_is_mean_time_times_remaining() -> None:
    now = iter([0.0, 10.0, 20.0]).__next__
    out: list[str] = []
    clock = StageClock(out.append, now=now)
    clock.plan(total=5, cached=1)  # t = 0
    clock.start("a")  # no estimate before the first fresh stage
    clock.finish()
    assert clock.estimate() == pytest.approx(10.0 * 3)  # t = 10: 10 s per stage, 3 left
    assert "[2/5]" in out[-1] and "left" not in out[-1]


def test_regime_series_summarises_matrices() -> None:
    regime = [{"step": 5, "matrices": {
        "a": {"sigma_max": 0.5, "sigma_median": 0.1, "r_over_sqrt_n": 0.9, "fro": 3.0, "n": 4},
        "b": {"sigma_max": 2.0, "sigma_median": 0.3, "r_over_sqrt_n": 0.5, "fro": 4.0, "n": 4},
        "c": {"sigma_max": 1.0, "sigma_median": 0.2, "r_over_sqrt_n": 0.7, "fro": 0.0, "n": 4},
    }}]
    (point,) = regime_series(regime)
    assert point == {"step": 5, "sigma_max": 2.0, "sigma_max_median": 1.0,
                     "sigma_median_median": 0.2, "r_over_sqrt_n": pytest.approx(0.7),
                     "fro": 5.0}
    assert regime_series(None) is None


def test_rescaled_sets_norms_and_refuses_zero() -> None:
    vector = TaskVector({"w": torch.tensor([3.0, 4.0])})
    assert rescaled({"t": vector}, {"t": 10.0})["t"].norm() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="zero task vector"):
        rescaled({"t": TaskVector({"w": torch.zeros(2)})}, {"t": 1.0})
