"""Image-classification tasks from local folders, for the CLIP recipe.

No dataset is downloaded: every task is read from a folder in this layout::

    <data-root>/<Name>/train/<class folder>/<image files>
    <data-root>/<Name>/test/<class folder>/<image files>
    <data-root>/<Name>/classnames.txt        (optional: "<folder><TAB><class name>" lines)

``<Name>`` is the task name (``Cars``, ``DTD``, ``EuroSAT``, ``GTSRB``, ``MNIST``,
``RESISC45``, ``SUN397``, ``SVHN``, ``ImageNet``, or any other). Class folders are sorted by
name: label ``k`` is the k-th folder, in train and test alike (both must hold the same class
folders). Images: ``.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm`` (any case),
read with Pillow and converted to RGB.

Splits (Ilharco et al. 2023): ``val`` is held out of ``train``: min(10 %, 5000) images drawn
with seed 0 (at least one); ``train`` is the rest — the literature's ``<Name>Val`` — and is
what fine-tuning sees, so that α can be chosen on ``val`` without touching ``test``.

Preprocessing of ``val`` and ``test`` is CLIP's evaluation transform: resize the shorter
side to the model's image size (bicubic), centre-crop a square, and normalise with the
model's mean/std. The first two happen here, once per image, into uint8 arrays;
normalisation happens in the backbone (:class:`orthoreg.clip.model.CLIPVisionBackbone`
accepts uint8 input), so a cached split is 4× smaller than float32 and shared by every
model with the same image size.

``train`` goes through open_clip's *training* transform (RandomResizedCrop, scale
(0.9, 1.0), bicubic), as the authors trained: it is cached as whole-image canvases plus the
original sizes (layout ``canvas``) and cropped afresh at every step
(:mod:`orthoreg.clip.augment`); ``augmentation=None`` caches it centre-cropped like the
other splits (no augmentation).

Caching: :func:`materialize` writes a split as one ``.npy`` (N, 3, S, S) uint8 array plus
labels (and, for canvases, original sizes), keyed by a hash of the file list (relative
paths, sizes, mtimes), S and the layout, and opens it memory-mapped. Training batches and
the coefficient searches then read tensors straight from the page cache instead of
decoding JPEGs every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from orthoreg.clip.augment import RandomCropTrainSet, RandomResizedCrop
from orthoreg.clip.templates import (
    DatasetSpec,
    dataset_spec,
    parse_classnames_file,
    resolve_classnames,
    unknown_folders,
)
from orthoreg.errors import OrthoRegError
from orthoreg.utils.io import atomic_write_text

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm"})
LAYOUT = ("<data-root>/<Name>/{train,test}/<class folder>/<image files> "
          "(optional <data-root>/<Name>/classnames.txt)")
SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_MAX = 5000
VAL_SEED = 0
#: bump when the pixels a file decodes to change (resize rule, crop rule, colour handling)
PREPROCESS_VERSION = 1
#: how a split is cached: centre crops (evaluation) or whole-image canvases (training crops)
LAYOUTS = ("center", "canvas")


class MissingDataError(OrthoRegError, FileNotFoundError):
    """A task folder, split folder or class folder is missing or empty; names the layout."""


# ------------------------------------------------------------------------------- images
def load_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """One image as CLIP sees it before normalisation: uint8 (3, size, size).

    Resize so the shorter side is ``size`` (bicubic, the longer side rounded down as
    torchvision's ``Resize(int)`` does), then centre-crop (top/left offsets rounded like
    torchvision's ``CenterCrop``).
    """
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_canvas(path: str | os.PathLike[str], size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The whole image resized to uint8 (3, size, size), and its original (height, width).

    Nothing is cut off, so a random crop chosen in the original's coordinates can be taken
    from the canvas later (:mod:`orthoreg.clip.augment`); the aspect ratio is undone there.
    """
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), (height, width)


# ------------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class FolderSplit:
    """The image files of one split and their labels (index into ``classes``)."""

    task: str
    split: str
    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: np.ndarray, split: str) -> FolderSplit:
        return FolderSplit(self.task, split, self.root, self.classes,
                           tuple(self.files[i] for i in indices), self.labels[indices])

    @cached_property
    def fingerprint(self) -> str:
        """Hash of (relative path, size, mtime, label) of every file: what a cache is keyed by.

        Computed once per listing (stat of every file: seconds for ImageNet-sized splits).
        """
        digest = hashlib.sha256(f"{self.task}|{self.split}|{self.classes}".encode())
        for path, label in zip(self.files, self.labels):
            stat = path.stat()
            rel = path.relative_to(self.root)
            digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}|{int(label)}\n".encode())
        return digest.hexdigest()[:20]


def task_dir(data_root: str | os.PathLike[str], name: str) -> Path:
    """``<data-root>/<Name>``, matched case-insensitively; a clear error when absent."""
    root = Path(data_root)
    if not root.is_dir():
        raise MissingDataError(f"data root {root} does not exist; expected layout: {LAYOUT}")
    exact = root / name
    if exact.is_dir():
        return exact
    matches = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise MissingDataError(
        f"task folder {exact} not found (data root holds: {', '.join(present) or 'nothing'}); "
        f"expected layout: {LAYOUT}"
    )


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(data_root: str | os.PathLike[str], name: str, split: str) -> FolderSplit:
    """List ``<data-root>/<Name>/<split>/<class>/*`` (split is ``train`` or ``test``)."""
    if split not in ("train", "test"):
        raise ValueError(f"folders hold 'train' and 'test' splits, not {split!r} "
                         "(val is held out of train)")
    base = task_dir(data_root, name)
    split_dir = base / split
    if not split_dir.is_dir():
        raise MissingDataError(f"{split_dir} not found; expected layout: {LAYOUT}")
    classes = _class_folders(split_dir)
    if not classes:
        raise MissingDataError(f"{split_dir} holds no class folders; expected layout: {LAYOUT}")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in (split_dir / folder).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise MissingDataError(
                f"class folder {split_dir / folder} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); expected layout: {LAYOUT}"
            )
        files += found
        labels += [label] * len(found)
    return FolderSplit(base.name, split, base, tuple(classes), tuple(files),
                       np.asarray(labels, dtype=np.int64))


def val_indices(n: int, seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train-minus-val, val) positions: val is min(10 %, 5000) of n (≥ 1), seeded."""
    if n < 2:
        raise ValueError(f"a train split of {n} image(s) cannot spare a validation split")
    size = max(1, min(int(n * VAL_FRACTION), VAL_MAX))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def folder_splits(data_root: str | os.PathLike[str], name: str,
                  splits: Sequence[str] = SPLITS) -> dict[str, FolderSplit]:
    """The requested splits of task ``name`` (``train`` = train minus val)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; choose from {SPLITS}")
    out: dict[str, FolderSplit] = {}
    if "train" in splits or "val" in splits:
        full = scan_split(data_root, name, "train")
        keep, held = val_indices(len(full))
        if "train" in splits:
            out["train"] = full.subset(keep, "train")
        if "val" in splits:
            out["val"] = full.subset(held, "val")
    if "test" in splits:
        test = scan_split(data_root, name, "test")
        reference = next(iter(out.values()), None)
        if reference is not None and test.classes != reference.classes:
            only = sorted(set(test.classes) ^ set(reference.classes))
            raise MissingDataError(
                f"{test.root}: train and test hold different class folders (first difference: "
                f"{only[0]!r}); both must hold the same classes"
            )
        out["test"] = test
    return {s: out[s] for s in splits}


def classnames_for(data_root: str | os.PathLike[str], name: str,
                   classes: Sequence[str]) -> list[str]:
    """Prompt names of the class folders, resolved as :mod:`clip_templates` describes."""
    spec = dataset_spec(name)
    path = task_dir(data_root, name) / "classnames.txt"
    overrides = (parse_classnames_file(path.read_text(encoding="utf-8"), str(path))
                 if path.is_file() else {})
    stray = [f for f in overrides if f not in classes]
    if stray:
        raise MissingDataError(f"{path}: names folder {stray[0]!r}, which is not a class folder")
    missing = [f for f in unknown_folders(spec, classes) if f not in overrides]
    if missing and spec.ordered_names is None:
        warnings.warn(f"{name}: class folders not in the built-in {spec.name} table (first: "
                      f"{missing[0]!r}); their prompts use the folder names", stacklevel=2)
    return resolve_classnames(spec, classes, overrides)


# ------------------------------------------------------------------------------- datasets
class FolderDataset(Dataset):
    """A split read lazily, one decoded image per item: (uint8 (3, S, S) tensor, label)."""

    def __init__(self, split: FolderSplit, size: int) -> None:
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.split.files[index], self.size)
        return torch.from_numpy(image), int(self.split.labels[index])


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def cache_path(cache_dir: str | os.PathLike[str], split: FolderSplit, size: int,
               layout: str = "center") -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cache layout {layout!r}; choose from {LAYOUTS}")
    tag = "" if layout == "center" else f"|{layout}"  # centre-crop keys predate layouts
    key = hashlib.sha256(
        f"{split.fingerprint}|{size}|v{PREPROCESS_VERSION}{tag}".encode()).hexdigest()[:16]
    suffix = "" if layout == "center" else f"-{layout}"
    return Path(cache_dir) / "images" / f"{split.task}-{split.split}-{size}px{suffix}-{key}.npy"


def _sizes_path(path: Path) -> Path:
    return path.with_suffix(".sizes.npy")


def materialize(split: FolderSplit, size: int, cache_dir: str | os.PathLike[str],
                workers: int | None = None, progress: bool = False,
                layout: str = "center") -> Path:
    """Decode a split once into the cache (atomic: a killed run leaves no half file).

    ``layout="canvas"`` stores whole-image canvases and, beside them, the original sizes.
    """
    path = cache_path(cache_dir, split, size, layout)
    canvas = layout == "canvas"
    if path.is_file() and path.with_suffix(".labels.npy").is_file() and (
            not canvas or _sizes_path(path).is_file()):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=(len(split), 3, size, size))
    sizes = np.zeros((len(split), 2), dtype=np.int64)
    decode = ((lambda p: load_canvas(p, size)) if canvas
              else (lambda p: (load_image(p, size), None)))
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(split), desc=f"{split.task}/{split.split} → {size}px",
                       leave=False, dynamic_ncols=True)
        # Pillow releases the GIL while decoding and resizing: threads scale
        with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
            for index, (image, original) in enumerate(pool.map(decode, split.files)):
                array[index] = image
                if original is not None:
                    sizes[index] = original
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        array.flush()
        del array
        labels_tmp = tmp.with_name(tmp.name.replace(".tmp.npy", ".labels.tmp.npy"))
        np.save(labels_tmp, split.labels)
        os.replace(labels_tmp, path.with_suffix(".labels.npy"))
        if canvas:
            sizes_tmp = tmp.with_name(tmp.name.replace(".tmp.npy", ".sizes.tmp.npy"))
            np.save(sizes_tmp, sizes)
            os.replace(sizes_tmp, _sizes_path(path))
        os.replace(tmp, path)
        meta = {"task": split.task, "split": split.split, "size": size, "count": len(split),
                "classes": list(split.classes), "root": str(split.root), "layout": layout}
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def open_cached(path: str | os.PathLike[str]) -> TensorDataset:
    """A materialised split as a TensorDataset over a copy-on-write memory map (no load)."""
    path = Path(path)
    images = np.load(path, mmap_mode="c")
    labels = np.load(path.with_suffix(".labels.npy"))
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def open_canvases(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, Tensor]:
    """A split cached with ``layout="canvas"``: (canvases memory-mapped, sizes, labels)."""
    path = Path(path)
    images = np.load(path, mmap_mode="c")
    sizes = np.load(_sizes_path(path))
    labels = np.load(path.with_suffix(".labels.npy"))
    return (torch.from_numpy(images), torch.from_numpy(sizes.astype(np.int64)),
            torch.from_numpy(labels.astype(np.int64)))


def decode_canvases(split: FolderSplit, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """A split's canvases decoded into memory (no cache: small data and tests)."""
    decoded = [load_canvas(path, size) for path in split.files]
    return (torch.from_numpy(np.stack([image for image, _ in decoded])),
            torch.tensor([list(original) for _, original in decoded], dtype=torch.int64),
            torch.from_numpy(split.labels.astype(np.int64)))


@dataclass
class ClipTaskData:
    """One task's splits (uint8 images on the model's image size) and its class names."""

    name: str
    classes: tuple[str, ...]
    classnames: list[str]
    splits: dict[str, Dataset]
    split_hashes: dict[str, str]
    spec: DatasetSpec

    def split(self, name: str) -> Dataset:
        if name not in self.splits:
            raise KeyError(f"task {self.name!r}: split {name!r} was not loaded "
                           f"(loaded: {sorted(self.splits)})")
        return self.splits[name]

    @property
    def train(self) -> Dataset:
        return self.split("train")

    @property
    def val(self) -> Dataset:
        return self.split("val")

    @property
    def test(self) -> Dataset:
        return self.split("test")


def load_task(data_root: str | os.PathLike[str], name: str, size: int,
              cache_dir: str | os.PathLike[str] | None = None,
              splits: Sequence[str] = SPLITS, workers: int | None = None,
              progress: bool = False,
              barrier: Callable[[], None] | None = None, writer: bool = True,
              augmentation: RandomResizedCrop | None = None,
              device: torch.device | str | None = None) -> ClipTaskData:
    """Task ``name`` (``Cars`` or ``CarsVal``: the same data) at image size ``size``.

    With ``cache_dir`` the splits are decoded once and memory-mapped (see module doc);
    without, they are :class:`FolderDataset` (decoded per access — for small data and tests).
    Under torchrun only one process should decode: pass ``writer`` (rank 0) and a
    ``barrier`` that every rank calls before opening the cache.

    ``augmentation`` (open_clip's RandomResizedCrop): the ``train`` split is cached as
    canvases and served as a :class:`~orthoreg.clip.augment.RandomCropTrainSet` whose
    batches are cropped afresh on ``device`` at every step; ``None``: centre crops.
    """
    from orthoreg.clip.templates import base_task_name

    base = base_task_name(name)
    folders = folder_splits(data_root, base, splits)
    first = next(iter(folders.values()))
    classnames = classnames_for(data_root, base, first.classes)
    datasets: dict[str, Dataset] = {}
    hashes = {split: f.fingerprint for split, f in folders.items()}
    layouts = {split: "canvas" if split == "train" and augmentation is not None else "center"
               for split in folders}
    if cache_dir is None:
        datasets = {split: FolderDataset(f, size) for split, f in folders.items()
                    if layouts[split] == "center"}
        if "canvas" in layouts.values():
            datasets["train"] = RandomCropTrainSet(*decode_canvases(folders["train"], size),
                                                   size, augmentation, device)  # type: ignore[arg-type]
    else:
        if writer:
            for split, folder in folders.items():
                materialize(folder, size, cache_dir, workers, progress, layouts[split])
        if barrier is not None:
            barrier()
        for split, folder in folders.items():
            path = cache_path(cache_dir, folder, size, layouts[split])
            if layouts[split] == "canvas":
                datasets[split] = RandomCropTrainSet(*open_canvases(path), size, augmentation,
                                                     device)  # type: ignore[arg-type]
            else:
                datasets[split] = open_cached(path)
    return ClipTaskData(first.task, first.classes, classnames,
                        {split: datasets[split] for split in folders}, hashes,
                        dataset_spec(base))
