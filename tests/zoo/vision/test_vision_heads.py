"""Frozen few-shot heads: exact shots, determinism, no trainable state, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orthoreg.utils.io import OrthoRegFileError, save_tensors
from orthoreg.zoo.vision.datasets import get_task, task_datasets
from orthoreg.zoo.vision.heads import Head, extract_features, fit_head, select_shots
from orthoreg.zoo.vision.models import get_model


@pytest.fixture(scope="module")
def blobs():
    return get_task("synthetic_blobs")


@pytest.fixture(scope="module")
def tiny():
    return get_model("tiny_cnn")


def test_select_shots_exact_seeded_and_nested() -> None:
    labels = np.repeat(np.arange(3), [7, 5, 9])
    picked = select_shots(labels, 3, shots=5, seed=0)
    assert picked.shape == (3, 5)
    for label, row in enumerate(picked):
        assert (labels[row] == label).all() and len(set(row.tolist())) == 5
    assert np.array_equal(picked, select_shots(labels, 3, 5, seed=0))
    assert not np.array_equal(picked, select_shots(labels, 3, 5, seed=1))
    smaller = select_shots(labels, 3, 2, seed=0)
    assert all(set(s) <= set(p) for s, p in zip(smaller.tolist(), picked.tolist()))
    with pytest.raises(ValueError, match="class 1 has 5 examples"):
        select_shots(labels, 3, shots=6, seed=0)


def test_fit_head_uses_exactly_shots_per_class(blobs, tiny) -> None:
    head = fit_head(tiny, blobs.train.images, blobs.train.labels, blobs.num_classes, shots=4, seed=0)
    assert head.shot_indices.shape == (blobs.num_classes, 4)
    for label, row in enumerate(head.shot_indices):
        assert (blobs.train.labels[row] == label).all()
    assert head.prototypes.shape == (blobs.num_classes, tiny.feature_dim)
    assert torch.allclose(head.prototypes.norm(dim=1), torch.ones(blobs.num_classes))


def test_fit_head_is_deterministic_and_seeded(blobs, tiny) -> None:
    args = (tiny, blobs.train.images, blobs.train.labels, blobs.num_classes)
    a, b, c = fit_head(*args, seed=0), fit_head(*args, seed=0), fit_head(*args, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.shot_indices, c.shot_indices)


def test_head_is_frozen_and_leaves_backbone_mode(blobs, tiny) -> None:
    tiny.train()
    head = fit_head(tiny, blobs.train.images, blobs.train.labels, blobs.num_classes)
    assert tiny.training  # fit_head restores the caller's mode
    tiny.eval()
    assert list(head.parameters()) == []
    assert all(not t.requires_grad for t in head.state_dict().values())
    features = torch.randn(5, tiny.feature_dim, requires_grad=True)
    logits = head(features)
    assert logits.shape == (5, blobs.num_classes)
    logits.sum().backward()  # gradients flow to the features, never into the head
    assert features.grad is not None
    assert (logits.abs() <= head.scale + 1e-4).all()


def test_preprocessed_and_raw_images_give_the_same_head(blobs, tiny) -> None:
    prepared = task_datasets(blobs, resolution=64, mean=tiny.mean, std=tiny.std)["train"].tensors[0]
    raw_head = fit_head(tiny, blobs.train.images, blobs.train.labels, blobs.num_classes)
    prepared_head = fit_head(tiny, prepared, blobs.train.labels, blobs.num_classes)
    assert torch.allclose(raw_head.prototypes, prepared_head.prototypes, atol=1e-5)


def test_head_beats_chance_on_blobs(blobs, tiny) -> None:
    head = fit_head(tiny, blobs.train.images, blobs.train.labels, blobs.num_classes, shots=10)
    predictions = head(extract_features(tiny, blobs.test.images)).argmax(1)
    accuracy = (predictions == blobs.test.labels).float().mean().item()
    assert accuracy > 1.5 / blobs.num_classes


def test_save_load_round_trip(blobs, tiny, tmp_path: Path) -> None:
    head = fit_head(tiny, blobs.train.images, blobs.train.labels, blobs.num_classes, scale=12.5)
    path = head.save(tmp_path / "head.safetensors", {"task": "synthetic_blobs", "splits": blobs.splits})
    loaded = Head.load(path)
    assert loaded.state_dict().keys() == head.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.state_dict().items())
    assert loaded.metadata["task"] == "synthetic_blobs" and loaded.metadata["scale"] == 12.5
    assert loaded.metadata["splits"] == blobs.splits
    features = torch.randn(3, tiny.feature_dim)
    assert torch.equal(loaded(features), head(features))


def test_load_refuses_other_files(tmp_path: Path) -> None:
    save_tensors(tmp_path / "vector.safetensors", {"w": torch.zeros(2)}, {"kind": "task_vector"})
    with pytest.raises(OrthoRegFileError, match="prototype_head"):
        Head.load(tmp_path / "vector.safetensors")
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(OrthoRegFileError):
        Head.load(tmp_path / "pickled.pt")


@pytest.mark.assets
def test_pretrained_head_on_mnist(require_asset) -> None:
    """Five shots per class on ImageNet features already classify MNIST well above chance."""
    require_asset("mnist")
    require_asset("mobilenet_v2")
    task = get_task("mnist", max_test=200)
    backbone = get_model("mobilenet_v2")
    head = fit_head(backbone, task.train.images, task.train.labels, task.num_classes, shots=5)
    assert set(head.shot_indices.flatten().tolist()) <= set(range(len(task.train)))
    accuracy = (head(extract_features(backbone, task.test.images)).argmax(1) == task.test.labels).float().mean()
    assert accuracy > 0.35
