"""``python -m orthoreg.bench penalty``: its FLOP model, its verdicts, and a toy-size run.

Timings are not checked (a benchmark, not a timed test); what is checked is that the
predictions it prints beside them follow from the shapes, and that a verdict says MISSED
when a figure misses its goal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.bench.costmodel import VIT_B32, VIT_L14, ours_matrix_flops, predicted_ratios
from orthoreg.bench.penalty import PAPER_OURS_GOAL, goals, main


def test_ours_counts_upper_gram_blocks_and_one_backward_product():
    # 768 wide: 4 blocks, 5/8 of the 2·m·n·k forward, + 2·m·n·k backward = 3.25·m·n·k
    assert ours_matrix_flops(3072, 768) == pytest.approx(3.25 * 3072 * 768 * 768)
    assert ours_matrix_flops(768, 3072) == ours_matrix_flops(3072, 768)
    assert ours_matrix_flops(64, 32) == pytest.approx(4.0 * 64 * 32 * 32)  # unblocked


def test_per_micro_batch_penalty_scales_with_accumulation_and_once_per_step_does_not():
    rows = predicted_ratios(VIT_B32, 128, probes=8)
    assert [r["accumulation"] for r in rows] == [1, 2, 4, 8]
    base = rows[0]["per_micro_batch_issue_formula"] - 1
    for row in rows:
        assert row["per_micro_batch_issue_formula"] - 1 == pytest.approx(base * row["accumulation"])
        assert row["once_per_step_issue_formula"] == pytest.approx(1 + base)
        assert 1 < row["once_per_step_hutchinson"] < row["once_per_step_ours"]
        assert row["once_per_step_ours"] - 1 == pytest.approx(base * 3.25 / 6, rel=0.01)
    # the bigger model has more tokens per weight: the same penalty is a smaller share
    assert predicted_ratios(VIT_L14, 128, 8)[0]["once_per_step_ours"] < rows[0]["once_per_step_ours"]


def test_verdicts_say_missed_when_a_figure_misses():
    paper = [{**row, "once_per_step_ours": PAPER_OURS_GOAL + 0.01}
             for row in predicted_ratios(VIT_B32, 128, 8)]
    figures = {"rows": [{"workload": "vit_full", "variant": "hutchinson k=8", "ratio": 1.5,
                         "batch": 4, "extrapolated_batch128": 1.01, "paired_ratio": 1.4}],
               "paper_setting": paper}
    verdicts = goals(figures, probes=8)
    ours = next(v for k, v in verdicts.items() if "ViT-B/32" in k and "ours" in k)
    assert ours.startswith(f"{PAPER_OURS_GOAL + 0.01:.4f} predicted (MISSED)")
    hutch = next(v for k, v in verdicts.items() if k.startswith("Hutchinson"))
    assert "(MISSED)" in hutch


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_penalty_benchmark_runs_at_toy_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "penalty.json"
    code = main(["--only", "cnn_full", "--steps", "1", "--warmup", "0", "--no-memory",
                 "--cnn-batch", "2", "--cnn-image", "16", "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert [row["variant"] for row in figures["rows"]] == ["off", "exact"]
    exact = figures["rows"][1]
    assert exact["penalty_gflop_ours"] < exact["penalty_gflop_issue_formula"]
    assert exact["predicted_ours"] > 1.0
    assert "cnn_full" in capsys.readouterr().out


def test_bytes_model_counts_eight_passes_with_a_reference_and_seven_without():
    from torch import nn

    from orthoreg.bench.costmodel import hutchinson_bytes, stream_bandwidth
    from orthoreg.regularizer import OrthoReg

    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 6, bias=False))
    weight_bytes = 2 * 30 * 4
    assert hutchinson_bytes(OrthoReg(model, estimator="hutchinson")) == 8 * weight_bytes
    assert hutchinson_bytes(OrthoReg(model, reference="zero")) == 7 * weight_bytes
    assert stream_bandwidth(OrthoReg(model)) > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_penalty_forms_and_regime_are_timed_at_toy_size(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "penalty.json"
    code = main(["--only", "cnn_full", "--steps", "1", "--warmup", "0", "--no-memory",
                 "--cnn-batch", "2", "--cnn-image", "16", "--json", str(out),
                 "--variants", "exact", "exact-shape", "exact-growth"])
    assert code == 0
    figures = json.loads(out.read_text())
    assert [row["variant"] for row in figures["rows"]] == [
        "off", "exact", "exact-shape", "exact-growth"]
    forms = {row["variant"]: row for row in figures["forms"]}
    assert set(forms) == {"exact", "exact-shape", "exact-growth"}
    assert forms["exact"]["over_paper"] == 1.0 and forms["exact-shape"]["form"] == "shape"
    rows = {row["variant"]: row for row in figures["rows"]}
    assert rows["exact-growth"]["penalty_gflop_ours"] < rows["exact"]["penalty_gflop_ours"] / 10
    (regime,) = figures["regime"]
    assert regime["log_every"] == 6 and regime["matrices"] > 0 and regime["overhead"] > 0
    assert any("shape form's penalty" in goal for goal in figures["goals"])
    assert any("regime tracking" in goal for goal in figures["goals"])
    assert "regime tracking" in capsys.readouterr().out
