"""open_clip's training crop on cached canvases: crop statistics, resampling, seeding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from orthoreg.clip.augment import (
    RandomCropTrainSet,
    RandomResizedCrop,
    resample_boxes,
    uniforms,
)
from orthoreg.clip.data import cache_path, folder_splits, load_canvas, load_task

CROP = RandomResizedCrop()


def _draws(height: int, width: int, count: int) -> np.ndarray:
    """``count`` crops of one image size: (count, 4) as (top, left, h, w)."""
    index = np.arange(count)
    crops = CROP.params(np.full(count, height), np.full(count, width),
                        uniforms(7, index, CROP.draws()))
    return np.stack(crops, axis=1)


def test_uniforms_depend_on_key_and_index_only() -> None:
    batch = uniforms(3, np.array([4, 9, 2]), 22)
    assert batch.shape == (3, 22) and ((batch >= 0) & (batch < 1)).all()
    assert np.array_equal(batch[1], uniforms(3, np.array([9]), 22)[0])
    assert not np.array_equal(batch, uniforms(4, np.array([4, 9, 2]), 22))
    many = uniforms(1, np.arange(20000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize(("height", "width"), [(40, 60), (300, 200), (32, 32)])
def test_crops_cover_90_to_100_percent_at_allowed_aspect_ratios(height: int, width: int) -> None:
    draws = _draws(height, width, 2000)
    top, left, h, w = draws.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    # rounding h and w to whole pixels moves the area by < (h + w + 1) / (H·W)
    slack = (height + width + 1) / (height * width)
    sampled = (area >= 0.9 - slack) & (area <= 1.0 + 1e-9)
    aspect = w / h
    sampled &= (aspect >= 3 / 4 - 2 / h) & (aspect <= 4 / 3 + 2 / h)
    # torchvision's fallback after 10 misses: the whole image clipped to the nearest allowed
    # aspect ratio, centred (a 300 × 200 image is too narrow for any 90 % crop at ≥ 3/4:
    # always 267 × 200 at top 16)
    ratio = width / height
    fallback_h = round(width / (3 / 4)) if ratio < 3 / 4 else height
    fallback_w = round(height * 4 / 3) if ratio > 4 / 3 else width
    fallback = (h == fallback_h) & (w == fallback_w) & (top == (height - fallback_h) // 2)
    assert (sampled | fallback).all()
    if (height, width) == (300, 200):
        assert fallback.all() and fallback_h == 267
    else:
        assert sampled.mean() > 0.2


def test_position_is_uniform_over_the_free_margin() -> None:
    draws = _draws(240, 300, 4000)
    top, left, h, w = draws.T
    free_top, free_left = 240 - h, 300 - w
    assert (free_top > 0).mean() > 0.5 and (free_left > 0).mean() > 0.5
    # uniform on {0, …, free}: mean free/2, and both ends are reached
    for offset, free in ((top, free_top), (left, free_left)):
        moving = free > 0
        assert abs(np.mean(offset[moving] / free[moving]) - 0.5) < 0.03
        assert (offset[moving] == 0).any() and (offset[moving] == free[moving]).any()


@pytest.mark.parametrize(("height", "width"), [(300, 200), (32, 32)])
def test_crop_distribution_matches_torchvisions_get_params(height: int, width: int) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.RandomResizedCrop(224, scale=(0.9, 1.0))
    image = torch.zeros(3, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = np.array([reference.get_params(image, reference.scale, reference.ratio)
                           for _ in range(3000)])
    ours = _draws(height, width, 3000)
    for column, name in ((2, "h"), (3, "w")):
        a, b = np.sort(ours[:, column]), np.sort(theirs[:, column])
        # two-sample Kolmogorov–Smirnov statistic; 0.05 is far above its 3000-draw noise
        grid = np.union1d(a, b)
        ks = np.max(np.abs(np.searchsorted(a, grid, "right") / len(a)
                           - np.searchsorted(b, grid, "right") / len(b)))
        assert ks < 0.05, (name, ks)
    full = lambda d: np.mean((d[:, 2] == height) & (d[:, 3] == width))  # noqa: E731
    assert abs(full(ours) - full(theirs)) < 0.04  # the central fallback, as often


def test_whole_canvas_box_is_the_identity() -> None:
    canvases = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2, dtype=torch.float64)
    assert torch.equal(resample_boxes(canvases, boxes, 16), canvases)


def test_resampling_matches_torchvisions_bicubic_resized_crop() -> None:
    functional = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 12, generator=generator) * 255, size=48, mode="bilinear")
    image = smooth.round().to(torch.uint8)  # (1, 3, 48, 48): canvas == original
    top, left, h, w = 3, 5, 40, 43
    ours = resample_boxes(image, torch.tensor([[left, top, left + w, top + h]],
                                              dtype=torch.float64), 32)[0]
    theirs = functional.resized_crop(image[0].float(), top, left, h, w, [32, 32],
                                     interpolation=InterpolationMode.BICUBIC, antialias=False)
    theirs = theirs.round().clamp(0, 255)
    # the same bicubic kernel at the same sampling points; only the outermost pixels
    # differ (torchvision clamps to the crop's edge, we read the canvas beyond it)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert (ours[inner].float() - theirs[inner]).abs().max() <= 1


def _train_set(device: str | None = None) -> RandomCropTrainSet:
    generator = torch.Generator().manual_seed(1)
    canvases = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=generator)
    sizes = torch.tensor([[40, 60], [20, 20], [100, 30], [64, 64], [33, 47], [20, 25]])
    return RandomCropTrainSet(canvases, sizes, torch.arange(6), 16, CROP, device)


def test_a_crop_depends_only_on_the_step_key_and_the_image() -> None:
    dataset = _train_set()
    # images 1, 3, 5 have aspect ratios a 90 % crop can match (images 0, 2, 4 are too wide
    # or tall: torchvision then always takes the same central fallback box)
    batch = dataset.gather([1, 3, 5], key=11)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.uint8
    assert torch.equal(batch, dataset.gather([1, 3, 5], key=11))
    # what a torchrun rank computes for its slice is what one process computes for it
    assert torch.equal(batch[1:], dataset.gather([3, 5], key=11))
    assert not torch.equal(batch, dataset.gather([1, 3, 5], key=12))
    assert torch.equal(dataset.gather([0], key=11), dataset.gather([0], key=12))


def test_batches_draw_one_key_from_the_seeded_global_generator() -> None:
    dataset = _train_set()
    indices = torch.tensor([1, 3, 5])
    torch.manual_seed(5)
    first, second = dataset.tensors[0][indices], dataset.tensors[0][indices]
    torch.manual_seed(5)
    assert torch.equal(dataset.tensors[0][indices], first)  # seeded: reproducible
    assert not torch.equal(first, second)  # a fresh crop at every step
    assert torch.equal(dataset.tensors[1][indices], indices)


def test_canvas_keeps_the_whole_image_and_its_size(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    canvas, size = load_canvas(tmp_path / "wide.png", 24)
    assert canvas.shape == (3, 24, 24) and size == (30, 60)
    # squashed, not cropped: the red and blue thirds are both still there
    assert canvas[0, 12, 2] > 200 and canvas[2, 12, -3] > 200


def test_load_task_serves_cropped_train_batches_and_centre_cropped_eval(
        data_root: Path, tmp_path: Path) -> None:
    data = load_task(data_root, "MNIST", 32, tmp_path, augmentation=CROP)
    assert isinstance(data.train, RandomCropTrainSet)
    folders = folder_splits(data_root, "MNIST")
    path = cache_path(tmp_path, folders["train"], 32, "canvas")
    assert path.is_file() and path.with_suffix(".sizes.npy").is_file()
    assert np.load(path.with_suffix(".sizes.npy")).tolist()[0] == [36, 40]  # the fixtures'
    assert cache_path(tmp_path, folders["val"], 32).is_file()  # eval splits: centre crops
    assert not isinstance(data.val, RandomCropTrainSet)
    torch.manual_seed(0)
    batch = data.train.tensors[0][torch.arange(4)]
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8
    plain = load_task(data_root, "MNIST", 32, tmp_path, augmentation=None)
    assert not isinstance(plain.train, RandomCropTrainSet)
    uncached = load_task(data_root, "MNIST", 32, None, augmentation=CROP)
    assert torch.equal(uncached.train.canvases, data.train.canvases)


def test_crop_parameters_do_not_touch_the_global_generator() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    CROP.params(np.array([40]), np.array([60]), uniforms(1, np.array([2]), CROP.draws()))
    _train_set().gather([0, 1], key=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert math.isclose(CROP.scale[0], 0.9) and CROP.to_dict()["kind"] == "random_resized_crop"
