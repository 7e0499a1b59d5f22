"""Property-based fuzzing of the three doors user input comes through.

* the config loader: any nested mapping (or YAML text) gives a valid config or a
  ConfigError, never another exception;
* the tensor-file loader: truncated, bit-flipped or re-headed files give an
  OrthoRegFileError (or load, when the damage hit only tensor bytes), never another
  exception or a hang;
* the CLI: any argv ends with exit status 0 or 2 and no traceback. Commands that would
  start real work (a benchmark run, a download, a fine-tune) are stubbed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import TINY_CONFIG, run_cli

from orthoreg.errors import ConfigError, OrthoRegError
from orthoreg.experiment.config import ExperimentConfig, from_mapping, load_config
from orthoreg.taskvector import TaskVector
from orthoreg.utils.io import OrthoRegFileError, read_tensors
from orthoreg.zoo.vision.heads import Head

FUZZ = settings(max_examples=60, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"took longer than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------- configs
KNOWN_KEYS = sorted({*TINY_CONFIG, "train", "data", "selection", "alphas", "seeds", "device",
                     "merge", "steps", "batch_size", "lr", "lambdas", "lr_multipliers",
                     "num", "start", "stop", "full", "lora", "linear", "partial", "rank",
                     "alpha", "select", "targets", "shots", "resolution", "max_train",
                     "estimator", "probes", "on_seed", "accumulation", "grad_clip"})
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=12), st.sampled_from(["synthetic_blobs", "cpu", "full",
                                                           "exact", "tiny_cnn", "ties"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def check_config(raw: Any) -> None:
    try:
        config = from_mapping(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(config, ExperimentConfig)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_random_mappings_give_a_config_or_a_config_error(raw):
    check_config(raw)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    return out


@FUZZ
@given(st.data())
def test_mutated_valid_configs_give_a_config_or_a_config_error(data):
    """Start from a valid config and change, add or delete a few keys anywhere in it."""
    raw = copy.deepcopy(TINY_CONFIG)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(raw)))
        node = raw
        for key in path[:-1]:
            node = node[key]
        if not path:
            raw[data.draw(keys)] = data.draw(values)
        elif data.draw(st.booleans()) and isinstance(node.get(path[-1]), dict):
            node[path[-1]][data.draw(keys)] = data.draw(values)
        elif data.draw(st.integers(0, 4)) == 0:
            del node[path[-1]]
        else:
            node[path[-1]] = data.draw(values)
    check_config(raw)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.builds(lambda v: json.dumps(v), st.dictionaries(keys, values, max_size=5))))
def test_random_config_files_give_a_config_or_a_config_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------------- tensor files
def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        TaskVector({"layer.weight": torch.arange(12.0).reshape(3, 4),
                    "layer.bias": torch.ones(3, dtype=torch.float16),
                    "steps": torch.tensor([1, 2], dtype=torch.int64)},
                   {"base_fingerprint": "abc", "paradigm": "full", "task": "t"}).save(path)
        return path.read_bytes()


VALID = _valid_file()
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]


def _truncate(data, cut: int) -> bytes:
    return VALID[: cut % (len(VALID) + 1)]


def _flip(data, positions: list[int]) -> bytes:
    buffer = bytearray(VALID)
    for position in positions:
        buffer[(position // 8) % len(buffer)] ^= 1 << (position % 8)
    return bytes(buffer)


def _reheader(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + VALID[8 + HEADER_LEN:]


json_headers = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda v: json.dumps(v).encode(), st.dictionaries(
        st.text(max_size=6), st.recursive(scalars, lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                         max_size=3)), max_leaves=8),
        max_size=4)),
    # the real header with one value replaced: the closest misses
    st.builds(lambda key, value: json.dumps({**json.loads(VALID[8:8 + HEADER_LEN]),
                                             key: value}).encode(),
              st.sampled_from(["layer.weight", "__metadata__", "steps"]),
              st.one_of(scalars, st.dictionaries(st.sampled_from(
                  ["dtype", "shape", "data_offsets", "orthoreg", "orthoreg.order"]),
                  st.one_of(scalars, st.lists(st.integers(-2, 2**40), max_size=3)),
                  max_size=3))),
)

damaged = st.one_of(
    st.builds(_truncate, st.none(), st.integers(0, len(VALID))),
    st.builds(_flip, st.none(), st.lists(st.integers(0, 8 * len(VALID) - 1), min_size=1,
                                         max_size=8)),
    st.builds(_reheader, json_headers),
    st.builds(lambda prefix: struct.pack("<Q", prefix) + VALID[8:],
              st.integers(0, 2**64 - 1)),
    st.binary(max_size=256),
)


@FUZZ
@given(damaged)
def test_damaged_tensor_files_load_or_raise_orthoreg_file_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        path.write_bytes(content)
        with time_limit(20):
            try:
                tensors, metadata = read_tensors(path)
            except OrthoRegFileError as exc:
                assert str(path) in str(exc)
            else:
                assert isinstance(tensors, dict) and isinstance(metadata, dict)
            for loader in (TaskVector.load, Head.load):
                try:
                    loader(path)
                except OrthoRegError:
                    pass


def test_the_undamaged_file_loads():
    """The fuzz's starting point is valid, so 'it loaded' above is a real outcome."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        path.write_bytes(VALID)
        vector = TaskVector.load(path)
    assert list(vector) == ["layer.weight", "layer.bias", "steps"]


# ------------------------------------------------------------------------------ CLI
class Stopped(OrthoRegError):
    """Raised by the stubs instead of starting real work (prints as a user error)."""


def _stop(*args, **kwargs):
    raise Stopped("stub: work would start here")


@pytest.fixture
def stubbed_cli(monkeypatch):
    """Stub everything that would do real work; other commands than the core ones too."""
    import orthoreg.experiment as experiment
    from orthoreg.bench import __main__ as bench
    from orthoreg.cli import build_parser, registry
    from orthoreg.zoo import assets

    build_parser()  # register every command module first
    monkeypatch.setattr(experiment, "Experiment", _stop)
    monkeypatch.setattr(assets, "fetch", _stop)
    monkeypatch.setattr(bench, "BENCHMARKS", {name: _stop for name in bench.BENCHMARKS})
    for name, command in list(registry.COMMANDS.items()):
        if name not in ("demo", "fetch", "merge", "info", "bench"):
            monkeypatch.setitem(registry.COMMANDS, name, registry.Command(
                name, command.help, command.configure, _stop))


def _files(folder: Path) -> dict[str, str]:
    vector = folder / "v.safetensors"
    TaskVector({"w": torch.ones(2, 2)}, {"base_fingerprint": "x"}).save(vector)
    other = folder / "other.safetensors"
    TaskVector({"w": torch.ones(3)}, {"base_fingerprint": "x"}).save(other)
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a tensor file")
    config = folder / "tiny.yaml"
    config.write_text(json.dumps(TINY_CONFIG))
    return {"vector": str(vector), "other": str(other), "garbage": str(garbage),
            "config": str(config), "dir": str(folder), "missing": str(folder / "nope")}


TOKENS = ["demo", "fetch", "merge", "info", "bench", "list", "search", "task_arithmetic",
          "ties", "dare", "--config", "--out", "--seeds", "--quick", "--set", "--param",
          "--no-progress", "--debug", "-h", "k=0.2", "train.steps=3", "seeds=[0,1]",
          "tasks=[nope]", "=", "0", "-1", "3", "mnist"]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.sampled_from(
    ["@vector", "@other", "@garbage", "@config", "@dir", "@missing"]), st.text(max_size=10)),
    max_size=7))
def test_random_argv_exits_0_or_2_without_a_traceback(stubbed_cli, argv):
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        files = _files(Path(folder))
        argv = [files[token[1:]] if token.startswith("@") and token[1:] in files else token
                for token in argv]
        with time_limit(60):
            result = run_cli(argv)
    assert result.code in (0, 2), (argv, result.err[-2000:])
    if "--debug" not in argv:
        assert "Traceback" not in result.err, (argv, result.err[-2000:])
