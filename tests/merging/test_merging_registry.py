"""The registry: lookup, listing, parameter validation, provenance of the result."""

from __future__ import annotations

import pytest
import torch

from orthoreg import merging
from orthoreg.merging.registry import MergeMethod, in_range, register
from orthoreg.taskvector import TaskVector


def vectors() -> list[TaskVector]:
    generator = torch.Generator().manual_seed(0)
    return [
        TaskVector(
            {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)},
            {"base_fingerprint": "abc", "paradigm": "full", "task": task, "lambda": 1.0},
        )
        for task in ("mnist", "digits")
    ]


def test_all_methods_are_registered_and_documented():
    assert merging.available() == (
        "dare", "dare_ties", "iso_c", "task_arithmetic", "ties", "tsv",
    )
    for name in merging.available():
        method = merging.get(name)
        assert isinstance(method, MergeMethod)
        assert method.name == name
        assert "et al." in method.paper
        assert "Defaults" in method.doc
        assert name in method.describe()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown merge method 'tiez'") as info:
        merging.merge("tiez", vectors())
    for name in merging.available():
        assert name in str(info.value)


def test_unknown_parameter_names_it_and_the_method():
    with pytest.raises(ValueError, match=r"'ties'.*unknown parameter 'k'.*density"):
        merging.merge("ties", vectors(), k=20)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": True}, "density"),
        ("ties", {"density": float("nan")}, "density"),
        ("dare", {"drop_rate": 1.0}, "drop_rate"),
        ("dare", {"drop_rate": -0.1}, "drop_rate"),
        ("dare", {"seed": -1}, "seed"),
        ("dare", {"seed": 1.5}, "seed"),
        ("dare_ties", {"drop_rate": 2}, "drop_rate"),
        ("tsv", {"rank_fraction": 0}, "rank_fraction"),
        ("tsv", {"nonmatrix": "median"}, "nonmatrix"),
        ("iso_c", {"nonmatrix": "max"}, "nonmatrix"),
        ("iso_c", {"nd_tensors": "flatten"}, "nd_tensors"),
        ("tsv", {"nd_tensors": True}, "nd_tensors"),
        ("ties", {"trim": "layer"}, "trim"),
        ("task_arithmetic", {"weights": []}, "weights"),
        ("task_arithmetic", {"weights": [1.0, "x"]}, "weights"),
    ],
)
def test_out_of_range_parameters_are_rejected_by_name(name, params, bad):
    with pytest.raises(ValueError, match=rf"'{name}'.*parameter '{bad}'"):
        merging.merge(name, vectors(), **params)


def test_bad_parameter_is_rejected_before_the_vectors_are_looked_at():
    with pytest.raises(ValueError, match="density"):
        merging.merge("ties", ["not a task vector"], density=3.0)


def test_weight_count_must_match_vector_count():
    with pytest.raises(ValueError, match=r"'task_arithmetic'.*'weights' has 3 entries for 2"):
        merging.merge("task_arithmetic", vectors(), weights=[1.0, 1.0, 1.0])


def test_result_records_identity_tasks_and_resolved_parameters():
    merged = merging.merge("ties", vectors())
    assert merged.metadata["base_fingerprint"] == "abc"
    assert merged.metadata["paradigm"] == "full"
    assert merged.metadata["task"] == ["mnist", "digits"]
    assert "lambda" not in merged.metadata  # per-task training record, not the merge's
    assert merged.metadata["merge"] == {
        "method": "ties", "params": {"density": 0.2, "trim": "global"}, "num_vectors": 2,
    }
    seeded = merging.dare(vectors(), seed=7)
    assert seeded.metadata["merge"]["params"] == {"drop_rate": 0.5, "seed": 7}


def test_each_method_carries_its_references_alpha_grid():
    unit = [i / 20 for i in range(21)]
    wide = [i / 10 for i in range(1, 31)]
    assert merging.default_alphas("task_arithmetic") == unit  # DESIGN.md §2, kept
    assert merging.default_alphas("dare") == unit  # a rescaled sum: E[τ̂] = τ
    for name in ("ties", "dare_ties", "tsv", "iso_c"):  # means and re-scaled spectra
        assert merging.default_alphas(name) == wide, name
        assert "0.1" in merging.get(name).alphas_source and "3.0" in merging.get(name).alphas_source
    assert len(wide) == 30 and wide[0] == 0.1 and wide[-1] == 3.0
    assert "α grid 0.1…3 (30 points)" in merging.get("tsv").describe()
    with pytest.raises(ValueError, match="unknown merge method 'tiez'"):
        merging.default_alphas("tiez")


def test_register_checks_the_grid_and_the_papers_values():
    def method(task_vectors, *, density=0.5):
        return task_vectors[0]

    with pytest.raises(ValueError, match="alphas"):
        register("empty_grid", paper="x", constraints={"density": in_range(0, 1)},
                 alphas=[])(method)
    with pytest.raises(ValueError, match="'density'"):
        register("bad_paper", paper="x", constraints={"density": in_range(0, 1)},
                 paper_params={"density": 3.0})(method)
    assert "empty_grid" not in merging.available() and "bad_paper" not in merging.available()


def test_registered_function_and_merge_agree():
    by_name = merging.merge("ties", vectors(), density=0.5)
    direct = merging.ties(vectors(), density=0.5)
    for key in by_name:
        assert torch.equal(by_name[key], direct[key])


def test_register_rejects_malformed_methods():
    with pytest.raises(ValueError, match="already registered"):
        register("ties", paper="x", constraints={})(lambda task_vectors: task_vectors[0])

    def no_default(task_vectors, *, density):
        return task_vectors[0]

    with pytest.raises(TypeError, match="needs a default"):
        register("no_default", paper="x", constraints={"density": in_range(0, 1)})(no_default)

    def unconstrained(task_vectors, *, density=0.5):
        return task_vectors[0]

    with pytest.raises(TypeError, match="constraints"):
        register("unconstrained", paper="x", constraints={})(unconstrained)

    def bad_default(task_vectors, *, density=2.0):
        return task_vectors[0]

    with pytest.raises(ValueError, match="'density'"):
        register("bad_default", paper="x", constraints={"density": in_range(0, 1)})(bad_default)
    assert "bad_default" not in merging.available()


@pytest.mark.parametrize("name", merging.available())
def test_every_method_keeps_identity_keys_names_shapes_and_dtypes(name):
    inputs = vectors()
    merged = merging.merge(name, inputs)
    assert isinstance(merged, TaskVector)
    assert merged.metadata["base_fingerprint"] == "abc"
    assert merged.metadata["paradigm"] == "full"
    assert merged.metadata["merge"]["method"] == name
    inputs[0].check_compatible(merged)
    assert list(merged) == list(inputs[0])
