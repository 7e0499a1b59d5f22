"""TaskVector: number-like algebra, geometry against numpy, application, storage, mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from orthoreg.taskvector import TaskVector, TaskVectorMismatch

META = {"base_fingerprint": "abc123", "paradigm": "full"}


def make_vector(seed: int, metadata: dict | None = None, **extra_shapes) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"layer.weight": (3, 4), "layer.bias": (3,), **extra_shapes}
    tensors = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    return TaskVector(tensors, dict(META if metadata is None else metadata))


def flat(vector: TaskVector) -> np.ndarray:
    return np.concatenate([vector[k].double().numpy().ravel() for k in vector])


@pytest.fixture
def pair() -> tuple[TaskVector, TaskVector]:
    return make_vector(0, {**META, "task": "mnist"}), make_vector(1, {**META, "task": "svhn"})


def test_algebra_matches_elementwise_arithmetic(pair):
    """a+b, a−b, −a, 0.3·a, a·0.3, a/2 and sum([...]) act tensor-wise like numbers."""
    a, b = pair
    for key in a:
        torch.testing.assert_close((a + b)[key], a[key] + b[key])
        torch.testing.assert_close((a - b)[key], a[key] - b[key])
        torch.testing.assert_close((-a)[key], -a[key])
        torch.testing.assert_close((0.3 * a)[key], 0.3 * a[key])
        torch.testing.assert_close((a * 0.3)[key], 0.3 * a[key])
        torch.testing.assert_close((a / 2)[key], a[key] / 2)
        torch.testing.assert_close(sum([a, b, a])[key], 2 * a[key] + b[key])
    assert (a + b).metadata["task"] == ["mnist", "svhn"]
    assert (a + b).metadata["paradigm"] == "full"
    assert (0.3 * a).metadata == a.metadata
    assert a["layer.weight"].equal(make_vector(0)["layer.weight"])  # operands left untouched


def test_dot_norm_cosine_match_numpy(pair):
    a, b = pair
    fa, fb = flat(a), flat(b)
    assert a.dot(b) == pytest.approx(float(fa @ fb), rel=1e-12)
    assert a.norm() == pytest.approx(float(np.linalg.norm(fa)), rel=1e-12)
    expected = float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))
    assert a.cosine(b) == pytest.approx(expected, rel=1e-12)
    assert a.cosine(a) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)
    assert a.cosine(TaskVector.zeros_like(a)) == 0.0


def test_per_layer_cosine_matches_numpy(pair):
    a, b = pair
    per_layer = a.per_layer_cosine(b)
    assert list(per_layer) == list(a)
    for key, value in per_layer.items():
        x, y = a[key].double().numpy().ravel(), b[key].double().numpy().ravel()
        assert value == pytest.approx(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))


def test_apply_to_module_in_place():
    """θ ← θ + α·τ on a module's own parameters (the returned module is the same object)."""
    module = nn.Sequential()
    module.add_module("layer", nn.Linear(4, 3))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    vector = make_vector(2)
    returned = vector.apply_to(module, alpha=0.5)
    assert returned is module
    for key in vector:
        torch.testing.assert_close(module.state_dict()[key], before[key] + 0.5 * vector[key])


def test_apply_to_state_dict_copies_and_leaves_original_untouched():
    state = {"layer.weight": torch.zeros(3, 4), "layer.bias": torch.ones(3), "other": torch.ones(2)}
    original = {k: v.clone() for k, v in state.items()}
    vector = make_vector(3)
    edited = vector.apply_to(state, alpha=2.0)
    for key, value in original.items():
        assert torch.equal(state[key], value)
    torch.testing.assert_close(edited["layer.weight"], 2.0 * vector["layer.weight"])
    torch.testing.assert_close(edited["layer.bias"], 1.0 + 2.0 * vector["layer.bias"])
    assert torch.equal(edited["other"], state["other"]) and edited["other"] is not state["other"]


def test_apply_to_target_lacking_a_tensor_or_shape_names_it():
    with pytest.raises(TaskVectorMismatch, match=r"layer\.bias"):
        make_vector(0).apply_to({"layer.weight": torch.zeros(3, 4)})
    with pytest.raises(TaskVectorMismatch, match=r"layer\.weight.*\(4, 3\)"):
        make_vector(0).apply_to({"layer.weight": torch.zeros(4, 3), "layer.bias": torch.zeros(3)})


def test_from_state_dicts_is_finetuned_minus_base():
    base = {"w": torch.randn(2, 2), "steps": torch.tensor(3)}
    finetuned = {"w": base["w"] + 1.5, "steps": torch.tensor(9)}
    vector = TaskVector.from_state_dicts(base, finetuned, metadata={"paradigm": "full"})
    assert list(vector) == ["w"]  # integer buffers are not part of a task vector
    torch.testing.assert_close(vector["w"], torch.full((2, 2), 1.5))
    assert vector.metadata["paradigm"] == "full" and len(vector.metadata["base_fingerprint"]) == 16


def _train_one_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()


def test_uncloned_theta0_is_refused_not_a_silent_zero_vector():
    """``model.state_dict()`` aliases the live weights: τ from it would be exactly zero."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    theta0 = model.state_dict()  # the trap: no clone
    _train_one_step(model)
    with pytest.raises(TaskVectorMismatch, match=r"'weight': .*share memory.*clone\(\)"):
        TaskVector.from_state_dicts(theta0, model.state_dict())


def test_cloned_theta0_gives_the_update():
    """The README's capture: a detached clone per tensor, taken before training."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _train_one_step(model)
    vector = TaskVector.from_state_dicts(theta0, model.state_dict())
    assert vector.norm() > 0
    torch.testing.assert_close(vector["weight"], model.weight.detach() - theta0["weight"])


def test_one_shared_tensor_is_named_and_keys_can_leave_it_out():
    base = {"a": torch.zeros(2), "frozen": torch.ones(3)}
    finetuned = {"a": torch.ones(2), "frozen": base["frozen"]}  # same tensor object
    with pytest.raises(TaskVectorMismatch, match="'frozen'"):
        TaskVector.from_state_dicts(base, finetuned)
    assert list(TaskVector.from_state_dicts(base, finetuned, keys=["a"])) == ["a"]
    equal_copy = {"a": torch.ones(2), "frozen": base["frozen"].clone()}  # equal, not shared
    assert TaskVector.from_state_dicts(base, equal_copy)["frozen"].abs().sum() == 0


def test_save_load_round_trip_is_bit_exact_safetensors(tmp_path, pair):
    a, _ = pair
    extra = {f"block{i}.weight": torch.randn(2, i + 1) for i in (3, 1, 2, 0)}  # unsorted
    vector = TaskVector({**a.tensors, "half": torch.randn(5).to(torch.bfloat16), **extra},
                        {**a.metadata, "lambda": 10.0, "seed": 3})
    path = vector.save(tmp_path / "tv.safetensors")
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file
        assert sorted(handle.keys()) == sorted(vector)
    loaded = TaskVector.load(path)
    assert list(loaded) == list(vector)  # the writer's order, in every process
    for key in vector:
        assert loaded[key].dtype == vector[key].dtype and torch.equal(loaded[key], vector[key])
    for key, value in vector.metadata.items():
        assert loaded.metadata[key] == value
    assert loaded.metadata["kind"] == "orthoreg.TaskVector" and "versions" in loaded.metadata


def test_mismatched_keys_name_the_first_offender():
    a = make_vector(0, **{"x.weight": (2, 2), "y.weight": (2, 2)})
    b = make_vector(1)
    with pytest.raises(TaskVectorMismatch, match=r"'x\.weight' only on the left"):
        a + b
    with pytest.raises(TaskVectorMismatch, match=r"'x\.weight' only on the right"):
        b.dot(a)


def test_mismatched_shape_names_the_tensor():
    a = make_vector(0, **{"z.weight": (2, 3)})
    b = make_vector(1, **{"z.weight": (3, 2)})
    with pytest.raises(TaskVectorMismatch, match=r"'z\.weight': shape \(2, 3\) vs \(3, 2\)"):
        a - b


@pytest.mark.parametrize("key,other", [("base_fingerprint", "zzz999"), ("paradigm", "lora")])
def test_mismatched_base_or_paradigm_is_refused(key, other):
    """Vectors from different θ0 or paradigms cannot be combined, even with equal keys."""
    a, b = make_vector(0), make_vector(1, {**META, key: other})
    for combine in (lambda: a + b, lambda: a.dot(b), lambda: a.cosine(b), lambda: sum([a, b])):
        with pytest.raises(TaskVectorMismatch, match=f"{key}.*{other}"):
            combine()


def test_load_refuses_other_kinds(tmp_path):
    from orthoreg.utils.io import save_tensors

    path = save_tensors(tmp_path / "ckpt.safetensors", {"w": torch.zeros(1)},
                        {"kind": "orthoreg.checkpoint"})
    with pytest.raises(TaskVectorMismatch, match="not a task vector"):
        TaskVector.load(path)


def test_empty_vector_is_refused():
    with pytest.raises(ValueError, match="at least one tensor"):
        TaskVector({})
