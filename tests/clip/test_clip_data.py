"""Image-folder tasks: layout, splits, preprocessing, cache, and the errors for bad layouts.

None of this needs open_clip (Pillow and numpy only), so it also runs in the main env.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orthoreg.clip.data import (
    LAYOUT,
    FolderDataset,
    MissingDataError,
    folder_splits,
    load_image,
    load_task,
    materialize,
    open_cached,
    scan_split,
    val_indices,
)

from .conftest import TASK_CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS, write_task


def test_scan_lists_sorted_class_folders_as_labels(data_root: Path) -> None:
    split = scan_split(data_root, "EuroSAT", "train")
    assert split.classes == ("AnnualCrop", "Forest", "River")
    assert len(split) == 3 * TRAIN_PER_CLASS
    assert np.bincount(split.labels).tolist() == [TRAIN_PER_CLASS] * 3
    assert all(split.files[i].parent.name == split.classes[split.labels[i]]
               for i in range(len(split)))


def test_val_split_is_min_10_percent_5000_seeded_and_disjoint() -> None:
    keep, held = val_indices(30)
    assert len(held) == 3 and len(keep) == 27
    assert set(keep).isdisjoint(held) and set(keep) | set(held) == set(range(30))
    again_keep, again_held = val_indices(30)
    assert (held == again_held).all() and (keep == again_keep).all()
    assert len(val_indices(120_000)[1]) == 5000
    assert len(val_indices(2)[1]) == 1  # never an empty validation split


def test_splits_train_is_train_minus_val(data_root: Path) -> None:
    splits = folder_splits(data_root, "MNIST")
    train, val, test = (splits[s] for s in ("train", "val", "test"))
    assert len(train) + len(val) == 3 * TRAIN_PER_CLASS and len(test) == 3 * TEST_PER_CLASS
    assert set(train.files).isdisjoint(val.files)


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    from PIL import Image

    # 60 wide × 30 high: left third red, middle third green, right third blue
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:40, 1] = 255
    pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 16)
    assert image.shape == (3, 16, 16) and image.dtype == np.uint8
    # resized to 32×16 and cropped to the middle 16 columns: mostly green, no pure blue edge
    assert image[1, :, 8].min() > 200 and image[2, :, 8].max() < 50
    grey = Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L")
    grey.save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png", 8).shape == (3, 8, 8)  # grey → RGB


def test_cache_matches_lazy_reads_and_is_reused(data_root: Path, tmp_path: Path) -> None:
    split = folder_splits(data_root, "MNIST", ("test",))["test"]
    path = materialize(split, 32, tmp_path)
    cached = open_cached(path)
    lazy = FolderDataset(split, 32)
    images, labels = cached.tensors
    assert images.dtype == torch.uint8 and tuple(images.shape) == (len(split), 3, 32, 32)
    for index in (0, len(split) - 1):
        x, y = lazy[index]
        assert torch.equal(images[index], x) and int(labels[index]) == y
    stamp = os.stat(path).st_mtime_ns
    assert materialize(split, 32, tmp_path) == path and os.stat(path).st_mtime_ns == stamp
    assert materialize(split, 16, tmp_path) != path  # another size, another entry


def test_cache_key_follows_the_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_task(root, "MNIST", TASK_CLASSES["MNIST"], train=3, test=2)
    before = folder_splits(root, "MNIST", ("test",))["test"]
    first = materialize(before, 8, tmp_path / "cache")
    extra = root / "MNIST" / "test" / "0" / "zzz.png"
    extra.write_bytes((root / "MNIST" / "test" / "0" / "000.png").read_bytes())
    after = folder_splits(root, "MNIST", ("test",))["test"]
    assert materialize(after, 8, tmp_path / "cache") != first


def test_load_task_accepts_val_suffix_and_records_split_hashes(data_root: Path,
                                                               tmp_path: Path) -> None:
    data = load_task(data_root, "EuroSATVal", 32, tmp_path)
    assert data.name == "EuroSAT"
    assert data.classnames == ["annual crop land", "forest", "river"]
    assert set(data.split_hashes) == {"train", "val", "test"}
    assert len(data.train) + len(data.val) == 3 * TRAIN_PER_CLASS
    with pytest.raises(KeyError, match="was not loaded"):
        load_task(data_root, "EuroSAT", 32, None, ("test",)).split("train")


def test_missing_task_folder_names_the_layout(data_root: Path) -> None:
    with pytest.raises(MissingDataError) as error:
        load_task(data_root, "Cars", 32)
    message = str(error.value)
    assert str(data_root / "Cars") in message and LAYOUT in message
    assert "EuroSAT" in message and "MNIST" in message  # what the root does hold


def test_missing_data_root_and_split_folders(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"data root .* does not exist"):
        scan_split(tmp_path / "nowhere", "MNIST", "train")
    (tmp_path / "MNIST" / "train" / "0").mkdir(parents=True)
    with pytest.raises(MissingDataError, match=r"MNIST/test not found; expected layout"):
        scan_split(tmp_path, "MNIST", "test")
    with pytest.raises(MissingDataError, match=r"train/0 holds no images"):
        scan_split(tmp_path, "MNIST", "train")


def test_train_and_test_must_hold_the_same_classes(tmp_path: Path) -> None:
    write_task(tmp_path, "MNIST", ("0", "1"), train=3, test=1)
    write_task(tmp_path, "Other", ("0", "2"), train=1, test=1)
    os.rename(tmp_path / "MNIST" / "test", tmp_path / "MNIST" / "test_old")
    os.rename(tmp_path / "Other" / "test", tmp_path / "MNIST" / "test")
    with pytest.raises(MissingDataError, match="different class folders"):
        folder_splits(tmp_path, "MNIST")


def test_classnames_file_must_name_existing_folders(tmp_path: Path) -> None:
    write_task(tmp_path, "EuroSAT", ("Forest", "River"), train=2, test=1)
    (tmp_path / "EuroSAT" / "classnames.txt").write_text("Forest\twoods\nDesert\tsand\n")
    with pytest.raises(MissingDataError, match="'Desert', which is not a class folder"):
        load_task(tmp_path, "EuroSAT", 8, None)
    (tmp_path / "EuroSAT" / "classnames.txt").write_text("Forest\twoods\n")
    assert load_task(tmp_path, "EuroSAT", 8, None).classnames == ["woods", "river"]
