"""Inputs that cannot be merged fail loudly, before any work, naming the offender."""

from __future__ import annotations

import pytest
import torch

from orthoreg import merging
from orthoreg.merging.base import check_mergeable
from orthoreg.taskvector import TaskVector, TaskVectorMismatch


def vector(fingerprint: str | None = "abc", paradigm: str = "full", **more) -> TaskVector:
    tensors = {"w": torch.ones(3, 2), "b": torch.ones(3), **more}
    metadata = {"paradigm": paradigm}
    if fingerprint is not None:
        metadata["base_fingerprint"] = fingerprint
    return TaskVector(tensors, metadata)


@pytest.mark.parametrize("name", merging.available())
def test_different_keys_raise(name):
    with pytest.raises(TaskVectorMismatch, match="'c' only on the right"):
        merging.merge(name, [vector(), vector(c=torch.ones(2))])


@pytest.mark.parametrize("name", merging.available())
def test_different_base_fingerprint_raises(name):
    with pytest.raises(TaskVectorMismatch, match="base_fingerprint"):
        merging.merge(name, [vector("abc"), vector("xyz")])


def test_different_paradigm_raises():
    with pytest.raises(TaskVectorMismatch, match="paradigm"):
        merging.merge("tsv", [vector(paradigm="full"), vector(paradigm="lora")])


def test_different_shapes_raise():
    other = TaskVector({"w": torch.ones(2, 3), "b": torch.ones(3)}, {"paradigm": "full"})
    with pytest.raises(TaskVectorMismatch, match="'w'"):
        merging.merge("iso_c", [vector(), other])


def test_fingerprints_are_compared_across_all_vectors_not_only_the_first():
    # vector 0 has no fingerprint, so pairwise checks against it alone would pass
    with pytest.raises(TaskVectorMismatch, match="task vectors 1 and 2 differ in base_fingerprint"):
        check_mergeable([vector(None), vector("abc"), vector("xyz")])


def test_missing_fingerprint_is_tolerated_and_filled_in():
    merged = merging.task_arithmetic([vector(None), vector("abc")])
    assert merged.metadata["base_fingerprint"] == "abc"


def test_empty_and_non_vector_inputs():
    with pytest.raises(ValueError, match="at least one"):
        merging.merge("task_arithmetic", [])
    with pytest.raises(TypeError, match="not a TaskVector"):
        merging.merge("task_arithmetic", [vector(), {"w": torch.ones(3, 2)}])


def test_mismatch_is_raised_before_any_tensor_work(monkeypatch):
    calls = []
    import orthoreg.merging.spectral as spectral

    monkeypatch.setattr(spectral, "task_singular_vector_merge",
                        lambda *a, **k: calls.append(1))
    with pytest.raises(TaskVectorMismatch):
        merging.tsv([vector("abc"), vector("xyz")])
    assert calls == []
