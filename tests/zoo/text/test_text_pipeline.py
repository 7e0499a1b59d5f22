"""The text family through the whole pipeline (all four paradigms), and `demo`'s config
resolution: built-in names and ``--quick`` variants for any config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoreg.cli.commands import builtin_config, merge_config, quick_variant, resolve_config
from orthoreg.cli.registry import UsageError
from orthoreg.errors import ConfigError
from orthoreg.experiment import Experiment, from_mapping, load_config

TINY_TEXT = {
    "name": "tiny-text",
    "model": "tiny_bert",
    "tasks": ["synthetic_text_a", "synthetic_text_b"],
    "control": "synthetic_text_c",
    "data": {"max_train": 32, "max_val": 12, "max_test": 16, "max_length": 16},
    "paradigms": {
        "full": {"lr": 3e-3},
        "linear": {"lr": 3e-3},
        "partial": {"lr": 3e-3, "select": "bert_attention"},
        "lora": {"lr": 1e-2, "targets": "bert_attention", "rank": 2, "alpha": 2},
    },
    "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
    "selection": {"lambdas": [1.0], "lr_multipliers": [1.0]},
    "alphas": {"num": 3},
    "negation_thresholds": [0.95],
}


@pytest.mark.slow  # ~40 CPU-seconds: 16 fine-tunes, 8 additions, 16 negations
def test_text_pipeline_end_to_end_all_paradigms(tmp_path: Path) -> None:
    results = Experiment(from_mapping(TINY_TEXT), tmp_path, log=lambda _: None,
                         progress=False).run()
    runs = results["runs"]
    assert {r["paradigm"] for r in runs} == {"full", "linear", "partial", "lora"}
    assert len(runs) == 8  # 4 paradigms × (baseline, orthoreg)
    for run in runs:
        assert 0.0 <= run["addition"]["abs"] <= 1.0
        assert set(run["addition"]["per_task"]) == set(TINY_TEXT["tasks"])
        assert run["negation"]["control"] >= 0.0
    # zero-shot (pretrained) accuracy per task, the control included
    assert set(results["pretrained"]) == {"synthetic_text_a", "synthetic_text_b",
                                          "synthetic_text_c"}
    vectors = sorted(tmp_path.glob("stages/*/vector.safetensors"))
    assert len(vectors) == 16  # 4 paradigms × 2 candidates × 2 tasks
    from orthoreg.taskvector import TaskVector

    names = {p: set(TaskVector.load(p)) for p in vectors}
    attention = {f"encoder.layer.{i}.attention.{leaf}.weight" for i in range(2)
                 for leaf in ("self.query", "self.key", "self.value", "output.dense")}
    by_paradigm = {TaskVector.load(p).metadata["paradigm"]: keys for p, keys in names.items()}
    assert by_paradigm["partial"] == attention and by_paradigm["lora"] == attention
    assert "embeddings.word_embeddings.weight" in by_paradigm["full"]
    assert by_paradigm["linear"] == by_paradigm["full"]  # base-model names everywhere
    report = (tmp_path / "report.md").read_text()
    assert "| lora | baseline |" in report
    assert json.loads((tmp_path / "results.json").read_text())["model"] == "tiny_bert"


def test_text_configs_validate() -> None:
    config = load_config(builtin_config("text"))
    assert config.model == "all_minilm_l6_v2" and len(config.tasks) == 8
    assert config.data.max_length == 32 and config.control == "bbc_news"
    assert config.paradigms["partial"].select == "bert_attention"
    assert config.paradigms["lora"].targets == "bert_attention"
    assert (config.selection.lambdas, config.selection.lr_multipliers) == ((1.0, 10.0),
                                                                           (1.0, 3.0))


def test_quick_composes_with_every_builtin_config() -> None:
    for name in ("embedded", "text"):
        path = resolve_config(name)
        quick = quick_variant(path)
        merged = from_mapping(merge_config(load_raw(path), load_raw(quick)))
        assert merged.train.steps < load_config(path).train.steps
    text_quick = from_mapping(merge_config(load_raw(resolve_config("text")),
                                           load_raw(quick_variant(resolve_config("text")))))
    assert len(text_quick.tasks) == 3 and set(text_quick.paradigms) == {
        "full", "linear", "partial", "lora"}
    assert text_quick.model == "all_minilm_l6_v2"  # inherited from text.yaml
    assert text_quick.paradigms["lora"].targets == "bert_attention"
    # the image quick run is unchanged: quick.yaml over embedded.yaml = quick.yaml alone
    assert from_mapping(merge_config(load_raw(resolve_config("embedded")),
                                     load_raw(builtin_config("quick")))) == \
        load_config(builtin_config("quick"))


def load_raw(path: Path) -> dict:
    from orthoreg.cli.commands import _read_mapping

    return _read_mapping(path)


def test_config_resolution_errors(tmp_path: Path) -> None:
    assert resolve_config(None) == builtin_config("embedded")
    with pytest.raises(ConfigError, match=r"built-in: .*text"):
        resolve_config("no_such_config")
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert resolve_config(str(mine)) == mine
    with pytest.raises(UsageError, match=r"mine\.quick\.yaml"):
        quick_variant(mine)
    (tmp_path / "mine.quick.yaml").write_text("train: {steps: 1}\n")
    assert quick_variant(mine) == tmp_path / "mine.quick.yaml"


def test_merge_config_is_deep_for_mappings_only() -> None:
    base = {"data": {"a": 1, "b": 2}, "tasks": ["x", "y"], "name": "n"}
    merged = merge_config(base, {"data": {"b": 3}, "tasks": ["z"]})
    assert merged == {"data": {"a": 1, "b": 3}, "tasks": ["z"], "name": "n"}
    assert base["data"] == {"a": 1, "b": 2}  # the base is not modified
