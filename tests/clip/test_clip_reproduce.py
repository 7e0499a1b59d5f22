"""``orthoreg clip reproduce``: preflight, estimate, table, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.cli import main
from orthoreg.clip.paper import PAPER_LAMBDAS, TABLE1_ADDITION, published_addition
from orthoreg.clip.reproduce import (
    ASSUMED_STEPS,
    Measurement,
    ModelChoice,
    ReproducePlan,
    estimate,
    format_table,
    missing_inputs,
    resolve_models,
    summarize,
)

from .conftest import TINY_NAME, needs_open_clip, write_task


def test_paper_values_are_only_the_cited_ones() -> None:
    # DESIGN.md §2: the ViT-B/32 task-addition table, nothing else
    assert {key[0] for key in TABLE1_ADDITION} == {"ViT-B-32"}
    assert len(TABLE1_ADDITION) == 8
    assert published_addition("ViT-B-32-quickgelu", "full", True).absolute == 73.41
    assert published_addition("ViT-B-32", "partial", True).normalized == 99.76
    assert published_addition("ViT-B-16", "full", True) is None
    assert PAPER_LAMBDAS["full"].cited and PAPER_LAMBDAS["lora"].value == 1.0
    assert not PAPER_LAMBDAS["linear"].cited and not PAPER_LAMBDAS["partial"].cited


def _addition(abs_: float, norm: float) -> dict:
    return {"merge": "task_arithmetic", "alpha": 0.3, "test_abs": abs_, "test_norm": norm}


def test_table_puts_the_papers_numbers_beside_ours_and_marks_the_rest_absent() -> None:
    rows = [summarize("ViT-B-32", "full", 0.0, {"addition": _addition(0.7, 0.8)}),
            summarize("ViT-B-32", "linear", 10.0, {"addition": _addition(0.75, 0.9)}),
            summarize("ViT-B-16", "full", 10.0, {"addition": _addition(0.8, 0.95)})]
    assert rows[0]["paper_absolute"] == 70.32 and rows[0]["ours_absolute"] == pytest.approx(70)
    table = format_table(rows)
    assert "| ViT-B-32 | full | 0 | 70.32 | 70.00 | 77.56 | 80.00 |" in table
    assert "| ViT-B-32 | linear | 10 (assumed) | 76.35 | 75.00 | 91.81 | 90.00 |" in table
    assert "| ViT-B-16 | full | 10 | absent | 80.00 | absent | 95.00 |" in table
    assert "DESIGN.md" in table


def test_models_resolve_to_presets_or_config_files(tmp_path: Path) -> None:
    models = resolve_models(["ViT-B-32", "ViT-L-14"], tmp_path)
    assert models[0] == ModelChoice("ViT-B-32", "ViT-B-32-quickgelu",
                                    str((tmp_path / "ViT-B-32-openai.safetensors").resolve()))
    assert models[1].config == "ViT-L-14-quickgelu"
    custom = resolve_models([str(tmp_path / "tiny.json")], tmp_path, {"tiny": "w.safetensors"})
    assert custom[0].key == "tiny" and custom[0].weights.endswith("w.safetensors")
    with pytest.raises(Exception, match="unknown model 'ViT-H-14'"):
        resolve_models(["ViT-H-14"], tmp_path)
    with pytest.raises(Exception, match="--weights names model 'ViT-B-16'"):
        resolve_models(["ViT-B-32"], tmp_path, {"ViT-B-16": "x"})


def test_missing_inputs_name_the_path_and_how_to_get_them(tmp_path: Path) -> None:
    write_task(tmp_path / "data", "MNIST", ("0", "1"), train=2, test=1)
    (tmp_path / "data" / "DTD" / "train").mkdir(parents=True)
    plan = ReproducePlan(out=str(tmp_path / "out"), data_root=str(tmp_path / "data"),
                         models=resolve_models(["ViT-B-32"], tmp_path / "weights"),
                         tasks=("MNIST", "DTD", "SVHN"))
    lines = [item.line() for item in missing_inputs(plan)]
    assert any(line.startswith("weights ViT-B-32:") and "clip_download_weights.py" in line
               for line in lines)
    assert any(line.startswith("data DTD/test:") for line in lines)
    assert any(line.startswith("data SVHN:") and "--tasks SVHN" in line for line in lines)
    assert any(line.startswith("data ImageNet:") and "manual" in line for line in lines)
    assert not any(" MNIST" in line for line in lines)


def test_estimate_multiplies_measured_step_times_by_the_recipes_steps(tmp_path: Path) -> None:
    models = (ModelChoice("ViT-B-32", "ViT-B-32-quickgelu", "w"),)
    plan = ReproducePlan(out=str(tmp_path), data_root=str(tmp_path), models=models,
                         tasks=("MNIST", "SVHN"), paradigms=("full",), negation=False)
    measured = {"ViT-B-32": Measurement("ViT-B-32", "cuda", 128, 1, "fp32", {"full": 0.5},
                                        1000.0)}
    # MNIST on disk: 5 epochs × ⌈1280/128⌉ = 50 steps; SVHN absent: the assumed 2000
    sizes = {"MNIST": {"train": 1280, "val": 100, "test": 200}, "SVHN": None}
    guess = estimate(plan, measured, sizes)
    # 2 λ × (50 + 2000) steps × 0.5 s
    assert guess["train_gpu_hours"] == pytest.approx(2 * (50 + ASSUMED_STEPS) * 0.5 / 3600)
    assert guess["eval_gpu_hours"] is None and "SVHN" in guess["steps_source"]
    sizes["SVHN"] = {"train": 256, "val": 10, "test": 20}
    guess = estimate(plan, measured, sizes)
    # per λ: zero-shot + fine-tuned val and test, then the 21-point val grid and the test
    per_lambda = (2 * 300 + 21 * 100 + 200) + (2 * 30 + 21 * 10 + 20)
    assert guess["eval_gpu_hours"] == pytest.approx(2 * per_lambda / 1000 / 3600)
    assert guess["train_gpu_hours"] == pytest.approx(2 * (50 + 4 * 2) * 0.5 / 3600)


@needs_open_clip
def test_cli_stops_before_any_work_when_inputs_are_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["clip", "reproduce", "--data-root", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--weights-dir", str(tmp_path / "w"), "--measure-steps", "0"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "missing on disk (10)" in captured.out  # the weights, 8 tasks, ImageNet
    assert "ViT-B-32-openai.safetensors" in captured.out and "--tasks Cars" in captured.out
    assert "input(s) missing on disk" in captured.err
    assert not (tmp_path / "out" / "runs").exists()
    assert main([*args, "--plan-only"]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert len(plan["missing"]) == 10
    assert main([*args, "--lam", "dense=3"]) == 2
    assert "unknown paradigm 'dense'" in capsys.readouterr().err


@needs_open_clip
@pytest.mark.slow
def test_reproduce_end_to_end_on_a_tiny_vit(tiny_config: Path, tiny_weights: Path,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """2 synthetic tasks, a control, 4 paradigms × 2 λ: runs, resumes, prints the table."""
    data = tmp_path / "data"
    # two tasks on which the random tiny ViT scores above 0 on val before and after 4 steps
    # at lr 1e-3 in every paradigm (LoRA barely moves), as the normalized accuracy needs
    write_task(data, "MNIST", ("0", "1", "2"), seed=0, train=20, test=4)
    write_task(data, "SVHN", ("0", "1", "2"), seed=2, train=20, test=4)
    write_task(data, "ImageNet", ("cat", "dog", "eel"), seed=5, train=20, test=3)
    out = tmp_path / "out"
    args = ["clip", "reproduce", "--data-root", str(data), "--out", str(out),
            "--models", str(tiny_config), "--weights", f"{TINY_NAME}={tiny_weights}",
            "--tasks", "MNIST,SVHN", "--steps", "4", "--batch-size", "8", "--lr", "1e-3",
            "--warmup-steps", "1",
            "--alphas", "0,0.5,1", "--cache", str(tmp_path / "cache"), "--measure-steps", "1",
            "--eval-batch-size", "64", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "16 fine-tuning runs, 8 additions, 8 negations (control ImageNet)" in printed
    assert "estimated GPU hours: training" in printed and "nothing missing on disk" in printed
    assert "λ full: 10 (full FT ViT-B/32" in printed and "λ linear: 10 (assumed" in printed
    table = (out / "table.md").read_text()
    for paradigm in ("full", "linear", "partial", "lora"):
        assert f"| {TINY_NAME} | {paradigm} | 0 | absent |" in table
    assert f"| {TINY_NAME} | lora | 1 | absent |" in table
    assert "wall time per stage: finetune 16×" in printed
    summary = json.loads((out / "reproduce.json").read_text())
    assert len(summary["results"]) == 8 and summary["estimate"]["total_gpu_hours"] > 0
    row = summary["results"][f"{TINY_NAME}/full/10"]
    assert 0 <= row["ours_absolute"] <= 100 and "ours_negation_target" in row
    run = out / "runs" / TINY_NAME / "partial-lam10" / "SVHN"
    assert json.loads((run / "run.json").read_text())["train"]["lam"] == 10
    addition = json.loads((out / "results" / TINY_NAME / "lora-lam1-addition.json").read_text())
    assert addition["val_curve"]["alphas"] == [0, 0.5, 1] and set(addition["run_keys"]) == {
        "MNIST", "SVHN"}
    stages = json.loads((out / "stages.json").read_text())
    assert len(stages) == 16 + 8 + 8 and not any(entry["cached"] for entry in stages)

    # rerun: every stage is read back, nothing is recomputed
    stamp = (run / "vector.safetensors").stat().st_mtime_ns
    assert main([*args, "--measure-steps", "0"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert len(stages) == 2 * 32 and all(entry["cached"] for entry in stages[32:])
    assert (run / "vector.safetensors").stat().st_mtime_ns == stamp
    assert "| absent |" in capsys.readouterr().out
