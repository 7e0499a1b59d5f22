"""Fixed, seeded, class-balanced train / val / test splits, shared by every task family.

A split depends only on the task name, the seed and the size caps, never on Python's
salted ``hash`` or on the order examples were decoded in; the sha256 of each index array is
recorded with every result so a result file can prove which examples it saw.

Indices refer to one index space per task: the dataset's train pool first, then its test
pool (``num_train`` marks the boundary; ``None`` when the dataset has no official test
split), so disjointness of the three splits is a plain set check.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Protocol

import numpy as np


class Labelled(Protocol):
    """What a split needs of a dataset: its labels and where its train pool ends."""

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def num_train(self) -> int | None: ...


def index_hash(indices: np.ndarray) -> str:
    """sha256 of the little-endian int64 bytes of an index array (sorted by construction)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def balanced_take(
    candidates: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` of ``candidates`` drawn at random, class counts differing by at most one.

    Shuffle, rank each candidate within its class, and take the lowest ranks first: every
    class gives its k-th example before any gives its (k+1)-th; a class that runs out
    simply stops contributing. Returned sorted, so the hash ignores draw order.
    """
    shuffled = rng.permutation(candidates)
    if count >= len(shuffled):
        return np.sort(shuffled)
    classes = labels[shuffled]
    by_class = np.argsort(classes, kind="stable")
    sorted_classes = classes[by_class]
    first_of_class = np.searchsorted(sorted_classes, sorted_classes, side="left")
    rank = np.empty(len(shuffled), dtype=np.int64)
    rank[by_class] = np.arange(len(shuffled)) - first_of_class
    return np.sort(shuffled[np.argsort(rank, kind="stable")[:count]])


def split_indices(
    raw: Labelled,
    name: str,
    seed: int,
    max_train: int,
    max_val: int,
    max_test: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
) -> dict[str, np.ndarray]:
    """Disjoint, class-balanced train/val/test indices, a pure function of its arguments.

    The generator is seeded by (seed, crc32(name)) so tasks sharing a seed do not share
    a permutation, and the result never depends on Python's salted ``hash``.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    everything = np.arange(len(raw.labels))
    if raw.num_train is not None:
        train_pool = everything[: raw.num_train]
        test_pool = everything[raw.num_train :]
        test = balanced_take(test_pool, raw.labels, max_test, rng)
    else:
        cap = min(max_test, int(test_fraction * len(everything)))
        test = balanced_take(everything, raw.labels, cap, rng)
        train_pool = np.setdiff1d(everything, test)
    val = balanced_take(train_pool, raw.labels, min(max_val, int(val_fraction * len(train_pool))), rng)
    train = balanced_take(np.setdiff1d(train_pool, val), raw.labels, max_train, rng)
    return {"train": train, "val": val, "test": test}
