"""Tasks: restricted unpickling, IDX parsing, seeded disjoint splits, preprocessing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from orthoreg.zoo.splits import balanced_take
from orthoreg.zoo.vision import datasets
from orthoreg.zoo.vision.datasets import (
    CONTROL_TASK,
    DEFAULT_TASKS,
    UnsafePickle,
    get_task,
    parse_idx,
    preprocess,
    safe_unpickle,
    task_datasets,
)
from orthoreg.zoo.vision.models import IMAGENET_MEAN, IMAGENET_STD

ASSET_TASKS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "animal_mnist": "animal_mnist"}


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle would contain
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(marker))
    with pytest.raises(UnsafePickle, match=r"system"):
        safe_unpickle(payload)
    assert not marker.exists()
    # The same payload would run under plain pickle: the test exercises a real threat.
    assert b"system" in payload


def test_unpickler_loads_numpy_arrays() -> None:
    """Protocol 4 is what Animal-MNIST uses (MNIST is a Python 2 protocol-2 pickle)."""
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2], dtype=np.int64))
    loaded = safe_unpickle(pickle.dumps(((arrays[0], arrays[1]), [arrays[1]]), protocol=4))
    assert np.array_equal(loaded[0][0], arrays[0]) and loaded[0][0].dtype == np.float32
    assert np.array_equal(loaded[1][0], arrays[1])


def test_unpickler_refuses_object_arrays() -> None:
    with pytest.raises(pickle.UnpicklingError):
        safe_unpickle(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=4))
    with pytest.raises(UnsafePickle, match="objects"):
        datasets._check_plain([(np.zeros(2), np.array([None], dtype=object))])


def test_parse_idx_round_trip() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()
    assert np.array_equal(parse_idx(raw), images)
    with pytest.raises(ValueError):
        parse_idx(raw[:-1])
    with pytest.raises(ValueError):
        parse_idx(b"\0\0\x0d\x01" + raw[4:])  # float32 IDX is not ours to read


def test_balanced_take_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 10, 200])
    candidates = np.arange(len(labels))
    take = balanced_take(candidates, labels, 43, np.random.default_rng(0))
    counts = np.bincount(labels[take], minlength=4)
    assert counts.sum() == 43 and counts.max() - counts.min() <= 1
    assert np.array_equal(take, balanced_take(candidates, labels, 43, np.random.default_rng(0)))
    # A class that runs out stops contributing; the others fill the quota.
    counts = np.bincount(labels[balanced_take(candidates, labels, 100, np.random.default_rng(1))])
    assert counts[2] == 10 and counts.sum() == 100 and counts[[0, 1, 3]].max() - counts[[0, 1, 3]].min() <= 1


def _check_task(task: datasets.TaskData, channels: int, size: int) -> None:
    splits = {name: task.split(name) for name in ("train", "val", "test")}
    for split in splits.values():
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (channels, size, size)
        assert len(split.images) == len(split.labels) == len(split.indices) > 0
        assert split.labels.min() >= 0 and split.labels.max() < task.num_classes
        assert len(np.unique(split.indices)) == len(split.indices)
    train, val, test = (set(splits[n].indices.tolist()) for n in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert set(task.splits) == {"train", "val", "test"}
    assert all(len(h) == 64 for h in task.splits.values())
    assert task.splits["train"] == datasets.index_hash(splits["train"].indices)


@pytest.mark.parametrize("name", ["synthetic_blobs", "digits"])
def test_splits_are_seeded_and_disjoint(name: str) -> None:
    a, b = get_task(name, seed=0), get_task(name, seed=0)
    c = get_task(name, seed=1)
    assert a.splits == b.splits
    assert all(np.array_equal(a.split(s).indices, b.split(s).indices) for s in a.splits)
    assert torch.equal(a.train.images, b.train.images)
    assert a.splits["train"] != c.splits["train"] and a.splits["val"] != c.splits["val"]
    if name == "digits":  # no official test split: the held-out test set moves with the seed
        assert a.splits["test"] != c.splits["test"]
    _check_task(a, *{"synthetic_blobs": (3, 16), "digits": (1, 8)}[name])
    assert a.classes == c.classes and a.seed == 0 and c.seed == 1


def test_official_test_split_smaller_than_cap_is_used_whole() -> None:
    raw = datasets.TASKS["synthetic_blobs"]()
    task = get_task("synthetic_blobs", seed=3)
    assert task.test.indices.tolist() == list(range(raw.num_train, len(raw.labels)))


def test_caps_are_respected() -> None:
    task = get_task("digits", max_train=100, max_val=30, max_test=50)
    assert (len(task.train), len(task.val), len(task.test)) == (100, 30, 50)
    assert np.bincount(task.train.labels.numpy()).tolist() == [10] * 10


def test_unknown_task() -> None:
    with pytest.raises(KeyError, match="known"):
        get_task("cifar10")


def test_control_task_is_not_a_default_task() -> None:
    assert CONTROL_TASK in datasets.TASKS and CONTROL_TASK not in DEFAULT_TASKS
    assert set(DEFAULT_TASKS) <= set(datasets.TASKS)


def test_digits_pixels_span_uint8() -> None:
    task = get_task("digits")
    assert task.train.images.max() == 255 and task.train.images.min() == 0


def test_preprocess_shape_range_and_channels() -> None:
    grey = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8).repeat(3, 1, 14, 14)
    out = preprocess(grey, 64)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = out * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-6)  # grey → identical channels
    # Native resolution passes through without resampling: exact values.
    exact = preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), 8, (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(exact, torch.ones_like(exact))
    with pytest.raises(ValueError):
        preprocess(grey.float(), 64)


def test_task_datasets_are_cached_and_aligned() -> None:
    task = get_task("synthetic_blobs")
    first = task_datasets(task, resolution=32)
    again = task_datasets(get_task("synthetic_blobs"), resolution=32)
    assert first is again
    images, labels = first["train"].tensors
    assert images.shape == (len(task.train), 3, 32, 32) and torch.equal(labels, task.train.labels)


@pytest.mark.assets
@pytest.mark.parametrize("name", sorted(ASSET_TASKS))
def test_embedded_tasks_load(name: str, require_asset) -> None:
    require_asset(ASSET_TASKS[name])
    task = get_task(name)
    _check_task(task, 1, 28)
    assert (len(task.train), len(task.val), len(task.test)) == (2000, 500, 1000)
    assert task.num_classes == 10 and len(set(task.classes)) == 10
    assert np.bincount(task.train.labels.numpy()).tolist() == [200] * 10
    assert task.source["sha256"] == datasets.assets.get_asset(ASSET_TASKS[name]).sha256
    if name in ("mnist", "fashion_mnist"):  # the official test split is used
        assert task.test.indices.min() >= 60_000 > task.train.indices.max()
        assert task.val.indices.max() < 60_000


@pytest.mark.assets
@pytest.mark.parametrize(
    "name,first_labels",
    [("mnist", [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]), ("fashion_mnist", [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])],
)
def test_decoded_archives_match_the_official_order(name: str, first_labels: list[int], require_asset) -> None:
    """The first training labels of MNIST and Fashion-MNIST are well known."""
    require_asset(name)
    raw = datasets.TASKS[name]()
    assert raw.images.shape == (70_000, 1, 28, 28) and raw.images.dtype == np.uint8
    assert raw.labels[:10].tolist() == first_labels
    assert raw.images.max() == 255


@pytest.mark.assets
def test_animal_mnist_is_sorted_by_class(require_asset) -> None:
    require_asset("animal_mnist")
    raw = datasets.TASKS["animal_mnist"]()
    assert raw.images.shape == (10_000, 1, 28, 28)
    assert np.array_equal(raw.labels, np.repeat(np.arange(10), 1000))
    assert raw.classes[0] == "bear" and raw.classes[-1] == "zebra"


@pytest.mark.assets
def test_mnist_pickle_decoder_is_restricted(require_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real archive goes through the restricted unpickler, not pickle.load."""
    require_asset("mnist")
    seen: list[int] = []
    original = datasets.safe_unpickle

    def spy(data: bytes):
        seen.append(len(data))
        return original(data)

    monkeypatch.setattr(datasets, "safe_unpickle", spy)
    monkeypatch.setattr(datasets.assets, "cached_arrays", lambda name, key, decode: decode())
    arrays = datasets._decode_mnist()
    assert seen and arrays["images"].dtype == np.uint8
    assert arrays["images"].shape == (70_000, 1, 28, 28)
    assert np.array_equal(arrays["images"], datasets.TASKS["mnist"]().images)  # the .npz cache agrees


def test_lfw_subset_when_scikit_image_is_installed() -> None:
    pytest.importorskip("skimage")
    task = get_task("lfw_subset")
    _check_task(task, 1, 25)
    assert task.classes == ["face", "non-face"]
