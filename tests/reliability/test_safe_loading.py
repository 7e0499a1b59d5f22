"""No code runs when a file is loaded, through every public loading path.

Each hostile file (pickle protocols 0 and 2 calling ``open``/``os.system``, a ``torch.save``
zip) would create a marker file if it were unpickled. The first test proves that, so the
others can fail; the rest load it through each entry point and require a clear
OrthoRegError and no marker. A static scan keeps unsafe loaders out of the library.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from reliability_helpers import REPO, TINY_CONFIG, Hostile, run_cli
from torch.utils.data import TensorDataset

from orthoreg.errors import ConfigError, OrthoRegError
from orthoreg.experiment.config import from_mapping, load_config
from orthoreg.experiment.pipeline import Experiment
from orthoreg.taskvector import TaskVector
from orthoreg.training import CHECKPOINT, TrainConfig, finetune
from orthoreg.utils.io import OrthoRegFileError, read_tensors
from orthoreg.zoo.vision.datasets import UnsafePickle, safe_unpickle
from orthoreg.zoo.vision.heads import Head


def test_the_hostile_files_do_run_code_when_unpickled(hostile: Hostile, tmp_path: Path):
    """Sanity check of the payloads: a plain pickle/torch load *does* create the marker.

    (Named ``.pt``: torch.load hands a ``.safetensors`` name to safetensors instead.)
    """
    path, marker = tmp_path / "file.pt", tmp_path / "marker"
    hostile.write(path, marker)
    if hostile.kind == "torch-save-zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_torch_weights_only_refuses_the_payload(tmp_path: Path):
    """The one torch.load in the library uses weights_only=True, which stops the payload."""
    from reliability_helpers import HOSTILE

    path, marker = tmp_path / "file.pt", tmp_path / "marker"
    next(h for h in HOSTILE if h.kind == "torch-save-zip").write(path, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_read_tensors_refuses(hostile: Hostile, tmp_path: Path):
    path, marker = tmp_path / "file.safetensors", tmp_path / "marker"
    hostile.write(path, marker)
    with pytest.raises(OrthoRegFileError, match="not a safetensors file"):
        read_tensors(path)
    assert not marker.exists()


def test_task_vector_load_refuses(hostile: Hostile, tmp_path: Path):
    path, marker = tmp_path / "vector.safetensors", tmp_path / "marker"
    hostile.write(path, marker)
    with pytest.raises(OrthoRegFileError, match=str(path)):
        TaskVector.load(path)
    assert not marker.exists()


def test_head_load_refuses(hostile: Hostile, tmp_path: Path):
    path, marker = tmp_path / "head.safetensors", tmp_path / "marker"
    hostile.write(path, marker)
    with pytest.raises(OrthoRegFileError):
        Head.load(path)
    assert not marker.exists()


def test_training_resume_refuses_a_pickled_checkpoint(hostile: Hostile, tmp_path: Path):
    """A pickle where ``checkpoint.safetensors`` is expected stops the run before step 1."""
    from orthoreg.paradigms import get_paradigm
    from orthoreg.zoo import get_model

    marker = tmp_path / "marker"
    hostile.write(tmp_path / "run" / CHECKPOINT, marker)
    model = get_paradigm("full").prepare(get_model("tiny_cnn"))
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,)))
    steps: list[dict[str, float]] = []
    with pytest.raises(OrthoRegFileError, match="not a safetensors file"):
        finetune(model, torch.nn.Linear(model.backbone.feature_dim, 2), data,
                 TrainConfig(steps=2, batch_size=8, progress=False), tmp_path / "run",
                 on_log=steps.append)
    assert not marker.exists() and steps == []


def test_cli_info_refuses(hostile: Hostile, tmp_path: Path):
    path, marker = tmp_path / "vector.safetensors", tmp_path / "marker"
    hostile.write(path, marker)
    result = run_cli(["info", str(path)])
    assert result.code == 2
    assert result.err.count("\n") == 1 and "not a safetensors file" in result.err
    assert "Traceback" not in result.err
    assert not marker.exists()


def test_cli_merge_refuses_and_writes_nothing(hostile: Hostile, tmp_path: Path):
    good = tmp_path / "good.safetensors"
    TaskVector({"w": torch.ones(2, 2)}).save(good)
    path, marker, out = tmp_path / "vector.safetensors", tmp_path / "marker", tmp_path / "x"
    hostile.write(path, marker)
    result = run_cli(["merge", "task_arithmetic", str(good), str(path), "--out", str(out)])
    assert result.code == 2 and "Traceback" not in result.err
    assert str(path) in result.err
    assert not marker.exists() and not out.exists()


def _stage_file(run: Path, kind: str, name: str) -> Path:
    matches = sorted(run.glob(f"stages/{kind}-*/{name}"))
    assert matches, f"the tiny run has no {kind} stage with {name}"
    return matches[0]


@pytest.mark.parametrize(("kind", "name"), [("finetune", "vector.safetensors"),
                                            ("head", "head.safetensors")])
def test_cached_stage_file_replaced_by_a_pickle(copy_run, hostile: Hostile, tmp_path: Path,
                                                kind: str, name: str):
    """A finished stage whose cached tensors were swapped for a pickle: a clean error that
    names the file, and no code runs."""
    run = copy_run()
    target, marker = _stage_file(run, kind, name), tmp_path / "marker"
    target.unlink()
    hostile.write(target, marker)
    with pytest.raises(OrthoRegError, match=str(target)):
        Experiment(from_mapping(TINY_CONFIG), run, log=lambda _: None, progress=False).run()
    assert not marker.exists()


def test_cached_stage_file_truncated_is_a_clean_error(copy_run):
    run = copy_run()
    target = _stage_file(run, "finetune", "vector.safetensors")
    target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(OrthoRegFileError, match=str(target)):
        Experiment(from_mapping(TINY_CONFIG), run, log=lambda _: None, progress=False).run()


def test_yaml_config_cannot_construct_python_objects(tmp_path: Path):
    """``!!python/object/apply`` tags are refused (yaml.safe_load), never executed."""
    marker = tmp_path / "marker"
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                    "paradigms: {full: {}}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    result = run_cli(["demo", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.code == 2 and not marker.exists()


def test_cli_set_value_with_python_tag_stays_a_string(tmp_path: Path):
    """``--set name=!!python/...`` is parsed by safe_load: refused as YAML, kept as text."""
    marker = tmp_path / "marker"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**TINY_CONFIG, "seeds": [-1]}))  # invalid: stops early
    result = run_cli(["demo", "--config", str(config), "--out", str(tmp_path / "out"),
                      "--set", f"name=!!python/object/apply:os.system ['touch {marker}']"])
    assert result.code == 2 and "seeds" in result.err
    assert not marker.exists()


def test_dataset_unpickler_refuses_the_payload(hostile: Hostile, tmp_path: Path):
    if hostile.kind == "torch-save-zip":
        pytest.skip("dataset archives hold plain pickles")
    path, marker = tmp_path / "data.pkl", tmp_path / "marker"
    hostile.write(path, marker)
    with pytest.raises(UnsafePickle):
        safe_unpickle(path.read_bytes())
    assert not marker.exists()


def test_hf_state_loader_refuses_pickles(hostile: Hostile, tmp_path: Path):
    """Checkpoint directories and .safetensors paths given to the HF helpers: no pickle."""
    hf = pytest.importorskip("orthoreg.integrations.hf")
    marker = tmp_path / "marker"
    hostile.write(tmp_path / "file.safetensors", marker)
    hostile.write(tmp_path / "ckpt" / "pytorch_model.bin", marker)
    for source in (tmp_path / "file.safetensors", tmp_path / "ckpt"):
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the point is the marker
            hf.load_state(source)
    assert not marker.exists()


def test_clip_weights_and_zero_shot_heads_refuse(hostile: Hostile, tmp_path: Path):
    """CLIP backbone weights (safetensors or torch.save of tensors only) and cached
    zero-shot heads: the payload is refused with an OrthoRegFileError."""
    clip = pytest.importorskip("orthoreg.clip.model")
    marker = tmp_path / "marker"
    for name in ("weights.pt", "weights.bin", "weights.safetensors"):
        hostile.write(tmp_path / name, marker)
        with pytest.raises(OrthoRegFileError):
            clip.read_weights(tmp_path / name)
    with pytest.raises(OrthoRegFileError):
        clip.ZeroShotHead.load(tmp_path / "weights.safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------------ static scan
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "?"
    return None


def test_library_has_no_unsafe_loader():
    """No torch.load without weights_only=True, no pickle.load(s), no np.load(allow_pickle=True),
    no yaml.load/unsafe_load, no eval/exec — anywhere in orthoreg/."""
    offenders = []
    for path in sorted((REPO / "orthoreg").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno} {name}"
            if name.endswith("torch.load") and _keyword(call, "weights_only") is not True:
                offenders.append(where)
            elif name in ("pickle.load", "pickle.loads", "marshal.loads", "dill.load",
                          "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                offenders.append(where)
            elif isinstance(call.func, ast.Name) and name in ("eval", "exec"):
                offenders.append(where)
            elif name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (
                    None, False):  # numpy's default is allow_pickle=False
                offenders.append(where)
    assert offenders == []
