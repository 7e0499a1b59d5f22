"""Fine-tuning the tiny CLIP ViT with every paradigm + OrthoReg, and the CLI end to end."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from orthoreg.cli import main
from orthoreg.clip.data import load_task
from orthoreg.clip.model import ClipModelSpec, load_clip, vision_backbone, zeroshot_head
from orthoreg.clip.recipe import build_paradigm
from orthoreg.evaluation import accuracy
from orthoreg.training import TrainConfig, finetune

from .conftest import TINY_NAME, needs_open_clip

pytestmark = needs_open_clip


@pytest.fixture(scope="module")
def setup(tiny_weights: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    spec = ClipModelSpec(TINY_NAME, str(tiny_weights))
    clip = load_clip(TINY_NAME, tiny_weights)
    data = load_task(data_root, "MNIST", 32, cache)
    head = zeroshot_head(clip, spec, data.name, data.classnames, data.spec.templates, cache)
    return vision_backbone(clip, spec), head, data


@pytest.mark.parametrize("paradigm", ["full", "linear", "partial", "lora"])
def test_each_paradigm_trains_with_orthoreg(setup, paradigm: str) -> None:
    backbone, head, data = setup
    model = build_paradigm(paradigm).prepare(copy.deepcopy(backbone))
    config = TrainConfig(steps=3, batch_size=8, lr=1e-3 if paradigm == "lora" else 1e-4,
                         warmup_steps=0, lam=1.0, progress=False, log_every=1)
    result = finetune(model, head, data.train, config)
    penalties = [record["penalty"] for record in result.history]
    # R(0) = ‖−I‖_F = √n > 0 for dense ΔW; the penalty term is live from step 1 on
    assert all(torch.isfinite(torch.tensor(penalties))) and penalties[-1] > 0
    vector = model.task_vector()
    state = dict(backbone.named_parameters())
    assert set(vector) <= set(state) and vector.norm() > 0
    assert vector.metadata["paradigm"] == paradigm
    # the vector reproduces the trained model: θ0 + τ through the paradigm's own edit
    x = data.test.tensors[0][:4]
    edited = build_paradigm(paradigm).edited(copy.deepcopy(backbone), vector, 1.0)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(edited.eval()(x), model(x), atol=1e-5)
    assert 0.0 <= accuracy(model, head, data.val) <= 1.0  # what a run records, per paradigm


def _finetune_args(model: Path, weights: Path, data_root: Path, task: str, out: Path,
                   cache: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--weights", str(weights), "--data-root",
            str(data_root), "--task", task, "--out", str(out), "--cache", str(cache),
            "--steps", "4", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-3",
            "--no-progress", *extra]


def test_cli_finetune_then_addition_and_negation(tiny_config: Path, tiny_weights: Path,
                                                 data_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    runs = {task: tmp_path / "runs" / task for task in ("MNIST", "EuroSAT")}
    for task, out in runs.items():
        args = _finetune_args(tiny_config, tiny_weights, data_root, task, out, cache,
                              "--paradigm", "full", "--lam", "1")
        assert main(args) == 0, capsys.readouterr().err
        record = json.loads((out / "run.json").read_text())
        assert record["task"] == task and record["train"]["lam"] == 1.0
        assert record["model"]["weights_sha256"] and record["train"]["steps"] == 4
        # the authors' recipe by default: fp32, open_clip's training crop, 2-D penalty
        assert record["precision"] == "fp32" and record["train"]["amp"] is False
        assert record["train"]["matrices"] == "2d"
        assert record["augmentation"]["kind"] == "random_resized_crop"
        assert record["augmentation"]["scale"] == [0.9, 1.0]
        assert set(record["accuracy"]) == {"finetuned", "zeroshot"}
        assert (out / "vector.safetensors").is_file() and (out / "head.safetensors").is_file()
        assert not (out / "checkpoint.safetensors").exists()
    assert "MNIST: full λ=1" in capsys.readouterr().out

    # a finished run is not redone
    again = _finetune_args(tiny_config, tiny_weights, data_root, "MNIST", runs["MNIST"], cache,
                           "--paradigm", "full", "--lam", "1")
    stamp = (runs["MNIST"] / "vector.safetensors").stat().st_mtime_ns
    assert main(again) == 0
    assert (runs["MNIST"] / "vector.safetensors").stat().st_mtime_ns == stamp
    # … and another run may not reuse its directory
    other = _finetune_args(tiny_config, tiny_weights, data_root, "MNIST", runs["MNIST"], cache,
                           "--paradigm", "full", "--lam", "3")
    assert main(other) == 2
    assert "already holds a different run" in capsys.readouterr().err

    addition_out = tmp_path / "addition.json"
    assert main(["evaluate", "addition", "--run", *map(str, runs.values()), "--cache",
                 str(cache), "--out", str(addition_out), "--alphas", "0,0.5,1",
                 "--no-progress"]) == 0
    addition = json.loads(addition_out.read_text())
    assert addition["paradigm"] == "full" and addition["alpha"] in (0.0, 0.5, 1.0)
    assert set(addition["per_task"]) == {"MNIST", "EuroSAT"}
    assert 0 <= addition["test_abs"] <= 1 and addition["val_curve"]["alphas"] == [0, 0.5, 1]

    negation_out = tmp_path / "negation.json"
    assert main(["evaluate", "negation", "--run", str(runs["MNIST"]), "--control", "EuroSAT",
                 "--cache", str(cache), "--out", str(negation_out), "--alphas", "0,0.5,1",
                 "--no-progress"]) == 0
    negation = json.loads(negation_out.read_text())
    result = negation["results"]["MNIST"]
    assert negation["control"] == "EuroSAT" and result["control"] == "EuroSAT"
    assert [row["threshold"] for row in result["thresholds"]] == [0.95, 0.9, 0.8]


def test_cli_precision_and_augmentation_options(tiny_config: Path, tiny_weights: Path,
                                                data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert main(_finetune_args(tiny_config, tiny_weights, data_root, "MNIST", out,
                               tmp_path / "cache", "--precision", "bf16", "--augment",
                               "none")) == 0
    record = json.loads((out / "run.json").read_text())
    # bf16 was asked for; on a CPU nothing is autocast, and the record says so
    assert record["precision"] == "bf16" and record["train"]["amp"] is False
    assert record["augmentation"] is None


def test_cli_errors_name_the_missing_thing(tiny_config: Path, tiny_weights: Path,
                                           data_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing_weights = _finetune_args(tiny_config, tmp_path / "absent.safetensors", data_root,
                                     "MNIST", tmp_path / "a", tmp_path / "cache")
    assert main(missing_weights) == 2
    err = capsys.readouterr().err
    assert "absent.safetensors not found" in err and "--weights" in err

    missing_task = _finetune_args(tiny_config, tiny_weights, data_root, "SVHN",
                                  tmp_path / "b", tmp_path / "cache")
    assert main(missing_task) == 2
    err = capsys.readouterr().err
    assert "task folder" in err and "SVHN" in err and "<data-root>/<Name>/{train,test}" in err

    assert main(["evaluate", "addition", "--run", str(tmp_path / "nothing")]) == 2
    assert "is not a finished CLIP run" in capsys.readouterr().err


def test_runs_from_different_paradigms_are_not_mixed(tiny_config: Path, tiny_weights: Path,
                                                     data_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    for task, paradigm in (("MNIST", "partial"), ("EuroSAT", "lora")):
        assert main(_finetune_args(tiny_config, tiny_weights, data_root, task,
                                   tmp_path / task, cache, "--paradigm", paradigm)) == 0
    assert main(["evaluate", "addition", "--run", str(tmp_path / "MNIST"),
                 str(tmp_path / "EuroSAT"), "--cache", str(cache)]) == 2
    assert "uses paradigm 'lora'" in capsys.readouterr().err


def test_augmented_training_resumes_bit_identically(setup, data_root: Path,
                                                   tmp_path: Path) -> None:
    """The crop keys come from the checkpointed generator: a killed run ends identical."""
    from orthoreg.clip.augment import RandomCropTrainSet, RandomResizedCrop

    backbone, head, _ = setup
    data = load_task(data_root, "MNIST", 32, tmp_path / "cache", augmentation=RandomResizedCrop())
    assert isinstance(data.train, RandomCropTrainSet)
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, lam=1.0,
                         progress=False, log_every=1, checkpoint_every=2)
    whole = build_paradigm("full").prepare(copy.deepcopy(backbone))
    finetune(whole, head, data.train, config)

    class Killed(Exception):
        pass

    def kill_at_step_3(record: dict[str, float]) -> None:
        if record["step"] == 3:
            raise Killed

    interrupted = build_paradigm("full").prepare(copy.deepcopy(backbone))
    with pytest.raises(Killed):
        finetune(interrupted, head, data.train, config, workdir=tmp_path / "run",
                 on_log=kill_at_step_3)
    torch.manual_seed(123)  # whatever the caller drew since, the checkpoint restores the state
    resumed = build_paradigm("full").prepare(copy.deepcopy(backbone))
    result = finetune(resumed, head, data.train, config, workdir=tmp_path / "run")
    assert result.resumed_from == 2
    for name, tensor in whole.task_vector().items():
        assert torch.equal(resumed.task_vector()[name], tensor), name
    # and the augmentation did something: training on centre crops ends elsewhere
    plain = load_task(data_root, "MNIST", 32, tmp_path / "cache", augmentation=None)
    centre = build_paradigm("full").prepare(copy.deepcopy(backbone))
    finetune(centre, head, plain.train, config)
    assert not torch.equal(centre.task_vector()["visual.conv1.weight"],
                           whole.task_vector()["visual.conv1.weight"])


@pytest.mark.parametrize("paradigm", ["full", "linear"])
def test_penalty_covers_exactly_the_2d_weights(setup, paradigm: str) -> None:
    """The authors' rule: 2-D weights only; the 4-D patch-embedding conv is left out."""
    from orthoreg.clip.recipe import train_config
    from orthoreg.training import Trainer

    backbone, head, data = setup
    config = train_config("MNIST", TINY_NAME, paradigm, len(data.train), lam=1.0, steps=1,
                          batch_size=8, progress=False)
    assert config.matrices == "2d"
    model = build_paradigm(paradigm).prepare(copy.deepcopy(backbone))

    def base_names(trainer: Trainer) -> set[str]:
        # the tangent paradigm trains ΔW as parameters "delta.visual__conv1__weight"
        return {n.removeprefix("delta.").replace("__", ".") for n in trainer.reg.names}

    covered = base_names(Trainer(model, head, data.train, config))
    assert not any(name.endswith("conv1.weight") for name in covered)
    assert any(name.endswith("attn.in_proj_weight") for name in covered)
    shapes = dict(backbone.named_parameters())
    assert all(shapes[name].ndim == 2 for name in covered)
    # the library's rule, still reachable, covers exactly one more weight: conv1
    wider = base_names(Trainer(model, head, data.train, replace(config, matrices="ndim>=2")))
    extra = wider - covered
    assert len(extra) == 1 and next(iter(extra)).endswith("visual.conv1.weight")
    assert shapes[next(iter(extra))].ndim == 4


def test_heads_ignore_training(setup) -> None:
    """The zero-shot head is frozen: no parameter, unchanged by a training step."""
    backbone, head, data = setup
    before = head.weight.clone()
    model = build_paradigm("full").prepare(copy.deepcopy(backbone))
    finetune(model, head, data.train, TrainConfig(steps=1, batch_size=8, warmup_steps=0,
                                                  progress=False))
    assert torch.equal(head.weight, before) and not isinstance(head, nn.Linear)
