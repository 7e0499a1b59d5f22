"""Every bad input gets a clear, one-line error before work starts.

Configs are checked key by key (the message names the dotted key); the CLI turns user
errors into one line on stderr and exit status 2, shows a traceback (exit 1) only for
bugs, and everything with ``--debug``; merges check keys, shapes, dtypes and base models
before touching a tensor.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability_helpers import PYTHON, REPO, TINY_CONFIG, python_env, run_cli

from orthoreg.cli.registry import COMMANDS
from orthoreg.errors import ConfigError, OrthoRegError
from orthoreg.experiment.config import _RANGES, ExperimentConfig, from_mapping, load_config
from orthoreg.experiment.pipeline import Experiment
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.zoo.assets import AssetCorrupted


def with_value(dotted: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY_CONFIG)
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


BAD_CONFIGS = [
    # (dotted key, value, the key the message must name)
    ("trian", {"steps": 3}, "trian"),
    ("train.stepz", 3, "train.stepz"),
    ("train.steps", "ten", "train.steps"),
    ("train.steps", True, "train.steps"),
    ("train.steps", 0, "train.steps"),
    ("train.lr", 0.1, "train.lr"),
    ("train.estimator", "magic", "train.estimator"),
    ("train.label_smoothing", 1.0, "train.label_smoothing"),
    ("train.batch_size", 64, "train.batch_size"),  # more than data.max_train = 32
    ("selection.lambdas", [-1.0], "selection.lambdas"),
    ("selection.lambdas", [0.0], "selection.lambdas"),
    ("selection.lambdas", [], "selection.lambdas"),
    ("selection.lambdas", "1.0", "selection.lambdas"),
    ("selection.lr_multipliers", [1.0, 2.0], "selection.lr_multipliers"),
    ("alphas.num", 0, "alphas.num"),
    ("alphas.num", 10_000, "alphas.num"),
    ("alphas.start", 1e9, "alphas.start"),
    ("alphas.stop", float("nan"), "alphas.stop"),
    ("alphas.stop", 10**400, "alphas.stop"),
    ("alphas", {"start": 1.0, "stop": 0.0}, "alphas.stop"),
    ("data.resolution", 8, "data.resolution"),
    ("data.max_train", -5, "data.max_train"),
    ("tasks", [], "tasks"),
    ("tasks", ["synthetic_blobs", "synthetic_blobs"], "tasks"),
    ("tasks", ["imagenet_typo"], "tasks"),
    ("tasks", "synthetic_blobs", "tasks"),
    ("control", "nope", "control"),
    ("control", "synthetic_blobs", "control"),  # also a fine-tuning task
    ("model", "resnet9000", "model"),
    ("merge", "avg_typo", "merge"),
    ("device", "gpu0", "device"),
    ("paradigms", {}, "paradigms"),
    ("paradigms", {"fulll": {}}, "paradigms.fulll"),
    ("paradigms", {"full": {"lr": -1}}, "paradigms.full.lr"),
    ("paradigms", {"lora": {"rank": 0}}, "paradigms.lora.rank"),
    ("negation_thresholds", [], "negation_thresholds"),
    ("negation_thresholds", [1.5], "negation_thresholds"),
    ("seeds", [-1], "seeds"),
    ("seeds", [0, 0], "seeds"),
    ("seeds", [1.5], "seeds"),
    ("selection.on_seed", "last", "selection.on_seed"),
]


@pytest.mark.parametrize(("dotted", "value", "key"), BAD_CONFIGS,
                         ids=[f"{d}={v!r}"[:40] for d, v, _ in BAD_CONFIGS])
def test_bad_config_is_a_one_line_config_error_naming_the_key(dotted, value, key):
    with pytest.raises(ConfigError) as caught:
        from_mapping(with_value(dotted, value))
    message = str(caught.value)
    assert re.search(rf"'{re.escape(key)}(\[\d+\])?'", message), message
    assert "\n" not in message


def test_the_base_config_of_these_cases_is_valid():
    """So that each case above fails for its one change, not for something else."""
    assert isinstance(from_mapping(TINY_CONFIG), ExperimentConfig)


def _field_type(dotted: str) -> Any:
    """The declared type of a ``_RANGES`` key (``paradigms.*.x`` is ParadigmConfig.x)."""
    hint: Any = ExperimentConfig
    for part in dotted.split("."):
        if part == "*":
            hint = typing.get_args(hint)[1]  # dict[str, ParadigmConfig]
            continue
        hint = typing.get_type_hints(hint)[part]
    return hint


#: values of each declared type, at least one of which breaks any sensible range rule
_OUT_OF_RANGE = {int: [-3, 0, 10**6], float: [-3.0, 0.0, 1e6], str: ["bogus"],
                 tuple[int, ...]: [[], [-1], [1, 1]], tuple[float, ...]: [[], [-1.0], [1e9]],
                 tuple[str, ...]: [[], ["a", "a"]], dict[str, tuple[float, ...]]: [{"x": []}]}


@pytest.mark.parametrize("dotted", sorted(_RANGES))
def test_every_range_rule_states_its_range(dotted: str):
    """The message is the rule's own text (no "expected a valid value"), and integer
    fields are described as integers, real fields as numbers."""
    rule = _RANGES[dotted]
    kind = _field_type(dotted)
    assert ("integer" in rule.text) == (kind is int or kind == tuple[int, ...]), rule.text
    def coerced(value: Any) -> Any:  # lists become tuples, as from_mapping makes them
        if isinstance(value, dict):
            return {k: tuple(v) for k, v in value.items()}
        return tuple(value) if isinstance(value, list) else value

    bad = [value for value in _OUT_OF_RANGE[kind] if not rule.test(coerced(value))]
    assert bad, f"no out-of-range example for {dotted}"
    key = dotted.replace("*", "full")
    raw = with_value(key, bad[0]) if "*" not in dotted else with_value(
        "paradigms", {"full": {dotted.rsplit(".", 1)[1]: bad[0]}})
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw)
    assert f"'{key}'" in str(caught.value) and f"(expected {rule.text})" in str(caught.value)


def test_negative_steps_say_which_values_are_valid():
    with pytest.raises(ConfigError, match=r"'train\.steps': -3 is out of range \(expected an "
                                          r"integer ≥ 1\)"):
        from_mapping(with_value("train.steps", -3))


def test_unknown_task_is_caught_before_any_work(tmp_path: Path):
    """The error comes from the config, before a lock, a stage or a model exists."""
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(with_value("tasks", ["synthetic_blobs", "mnits"])))
    result = run_cli(["demo", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.code == 2
    assert "'tasks" in result.err and "mnits" in result.err and "mnist" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00\x01binary", "not UTF-8"),
    (b"train: {steps: [1,\n", "not valid YAML"),
    (b"- just\n- a list\n", "mapping"),
    (b"a: &x [*x]\n", "."),
])
def test_unreadable_config_files(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_selection_matching_nothing_fails_before_any_stage(tmp_path: Path):
    """A partial-fine-tuning selection that matches no parameter of the model is a config
    error raised before any head is fitted or any fine-tuning starts."""
    raw = with_value("paradigms", {"partial": {"select": "no_such_layer.*"}})
    experiment = Experiment(from_mapping(raw), tmp_path / "out", log=lambda _: None,
                            progress=False)
    with pytest.raises(ConfigError, match=r"'paradigms\.partial") as caught:
        experiment.run()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "stages").exists()


def test_more_shots_than_examples_is_a_config_error(tmp_path: Path):
    """32 training images over 4 classes cannot give 20 shots per class."""
    experiment = Experiment(from_mapping(with_value("data.shots", 20)), tmp_path / "out",
                            log=lambda _: None, progress=False)
    with pytest.raises(ConfigError, match=r"'data\.shots'.*synthetic_blobs"):
        experiment.run()


# ------------------------------------------------------------------------------ CLI
def test_cli_bad_config_subprocess_prints_one_line_and_exits_2(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: -3}\nparadigms: {full: {}}\n")
    result = subprocess.run([PYTHON, "-m", "orthoreg", "demo", "--config", str(path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=python_env(), cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "'train.steps'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_debug_shows_the_traceback_of_a_user_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: -3}\nparadigms: {full: {}}\n")
    result = run_cli(["--debug", "demo", "--config", str(path), "--out", str(tmp_path)])
    assert result.code == 2
    assert "Traceback" in result.err and "ConfigError" in result.err


@pytest.fixture
def broken_command(monkeypatch):
    """Make `orthoreg info` hit a bug (an exception that is not a user error)."""
    from orthoreg.cli import registry

    def crash(args):
        return {}["a bug"]

    monkeypatch.setitem(registry.COMMANDS, "info",
                        registry.Command("info", COMMANDS["info"].help,
                                         COMMANDS["info"].configure, crash))


def test_cli_internal_bug_exits_1_with_traceback(broken_command):
    result = run_cli(["info", "x.safetensors"])
    assert result.code == 1
    assert "Traceback" in result.err and "KeyError" in result.err
    assert "internal error" in result.err


@pytest.mark.parametrize("argv", [[], ["nope"], ["demo", "--seeds", "many"],
                                  ["merge"], ["info"], ["--help"], ["demo", "--help"]])
def test_cli_usage_errors_exit_2_help_exits_0(argv):
    result = run_cli(argv)
    assert result.code == (0 if "--help" in argv else 2)
    assert "Traceback" not in result.err


def save(path: Path, tensors: dict[str, torch.Tensor], **meta: Any) -> Path:
    TaskVector(tensors, {"base_fingerprint": "base-A", "paradigm": "full", **meta}).save(path)
    return path


@pytest.fixture
def vectors(tmp_path: Path) -> dict[str, Path]:
    w = torch.ones(2, 3)
    return {
        "a": save(tmp_path / "a.safetensors", {"w": w, "b": torch.ones(3)}),
        "b": save(tmp_path / "b.safetensors", {"w": 2 * w, "b": torch.ones(3)}),
        "keys": save(tmp_path / "keys.safetensors", {"w": w, "c": torch.ones(3)}),
        "shape": save(tmp_path / "shape.safetensors", {"w": torch.ones(3, 2), "b": w[0]}),
        "dtype": save(tmp_path / "dtype.safetensors", {"w": w.double(), "b": torch.ones(3)}),
        "base": save(tmp_path / "base.safetensors", {"w": w, "b": torch.ones(3)},
                     base_fingerprint="base-B"),
        "paradigm": save(tmp_path / "paradigm.safetensors", {"w": w, "b": torch.ones(3)},
                         paradigm="linear"),
    }


@pytest.mark.parametrize(("other", "expected"), [
    ("keys", "keys"), ("shape", "shape"), ("dtype", "dtype"), ("base", "base_fingerprint"),
    ("paradigm", "paradigm"),
])
def test_cli_merge_checks_vectors_first_and_writes_nothing(vectors, tmp_path: Path, other: str,
                                                           expected: str):
    out = tmp_path / "merged.safetensors"
    result = run_cli(["merge", "task_arithmetic", str(vectors["a"]), str(vectors[other]),
                      "--out", str(out)])
    assert result.code == 2 and expected in result.err and "Traceback" not in result.err
    assert result.err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["merge", "tsv_typo"], "unknown merge method"),
    (["merge", "ties", "--param", "k=lots"], "'k'"),
    (["merge", "ties", "--param", "nope=1"], "'nope'"),
    (["merge", "ties", "--param", "k"], "key=value"),
])
def test_cli_merge_bad_method_or_parameter_is_a_user_error(vectors, tmp_path: Path, argv,
                                                           expected):
    out = tmp_path / "merged.safetensors"
    result = run_cli([*argv[:2], str(vectors["a"]), str(vectors["b"]), "--out", str(out),
                      *argv[2:]])
    assert result.code == 2, result.err
    assert expected in result.err and "Traceback" not in result.err
    assert not out.exists()


def test_cli_merge_into_a_directory_is_a_user_error(vectors, tmp_path: Path):
    result = run_cli(["merge", "task_arithmetic", str(vectors["a"]), "--out", str(tmp_path)])
    assert result.code == 2 and "Traceback" not in result.err


def test_cli_fetch_unknown_asset_is_a_user_error():
    result = run_cli(["fetch", "no_such_asset"])
    assert result.code == 2 and "no_such_asset" in result.err and "Traceback" not in result.err


def test_cli_merge_good_inputs_still_work(vectors, tmp_path: Path):
    out = tmp_path / "merged.safetensors"
    result = run_cli(["merge", "task_arithmetic", str(vectors["a"]), str(vectors["b"]),
                      "--out", str(out)])
    assert result.code == 0, result.err
    assert torch.equal(TaskVector.load(out)["w"], torch.full((2, 3), 3.0))


@pytest.mark.parametrize("other", ["keys", "shape", "base", "paradigm"])
def test_cli_info_checks_every_vector_before_printing(vectors, other: str):
    """A mismatch in the last file: one error line, and not half a report above it."""
    result = run_cli(["info", str(vectors["a"]), str(vectors["b"]), str(vectors[other])])
    assert result.code == 2 and result.out == "" and "Traceback" not in result.err
    assert result.err.count("\n") == 1


def test_cli_info_good_inputs_print_norms_and_cosines(vectors):
    result = run_cli(["info", str(vectors["a"]), str(vectors["b"])])
    assert result.code == 0, result.err
    assert "pairwise cosine:" in result.out and result.out.count("‖τ‖ = ") == 2


def test_cli_merge_help_lists_what_each_method_accepts():
    """Built from the registry: every method with exactly its parameters, and the example
    given for --param is accepted by the method it names (``k=0.2`` was not)."""
    from orthoreg import merging

    text = run_cli(["merge", "--help"]).out
    flat = " ".join(text.split())
    example = re.search(r"e\.g\. --param (\w+)=(\S+) for (\w+)", flat)
    assert example, flat
    key, value, method = example.groups()
    merging.get(method).resolve({key: yaml.safe_load(value)})
    listing = text.split("accepts", 1)[1]
    blocks = re.split(r"\n  (?=\S)", "\n" + listing.split("\n", 1)[1])
    listed = {block.split()[0].rstrip(":"): set(re.findall(r"^\s+(\w+)=", block, re.M))
              for block in blocks if block.strip()}
    assert listed == {name: set(merging.get(name).defaults) for name in merging.available()}


def test_apply_checks_everything_before_changing_the_model():
    """A vector with one bad tensor must not leave the target half edited."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vector = TaskVector({"0.weight": torch.ones(2, 3), "1.weight": torch.ones(3, 3)})
    with pytest.raises(TaskVectorMismatch, match=r"1\.weight"):
        vector.apply_to(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_corrupted_asset_is_a_user_error(tmp_path: Path, monkeypatch):
    """A damaged download is the user's to fix (refetch), not an orthoreg bug."""
    from orthoreg.zoo import assets

    asset = next(a for a in assets.registry().values() if not a.optional)
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    (tmp_path / asset.filename).write_bytes(b"not the archive")
    with pytest.raises(AssetCorrupted) as caught:
        assets.path(asset.name)
    assert isinstance(caught.value, OrthoRegError)
    assert asset.fetch_command in str(caught.value)
