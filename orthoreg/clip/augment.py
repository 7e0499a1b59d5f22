"""open_clip's training augmentation, on cached images, one fresh random crop per step.

The authors fine-tune through open_clip's training transform (``create_model_and_transforms``
→ ``preprocess_train``, used by tangent_task_arithmetic's ``finetune.py``)::

    RandomResizedCrop(S, scale=(0.9, 1.0), ratio=(3/4, 4/3), interpolation=BICUBIC)
    → RGB → ToTensor → Normalize(mean, std)

so every epoch sees each training image under a different crop: 90–100 % of the image's
area, aspect ratio within [3/4, 4/3], anywhere in the image, resized to S × S. Evaluation
uses the centre crop (:mod:`orthoreg.clip.data`).

How it is done here without decoding JPEGs every step:

- **Cache**: each training image is decoded once into a *canvas*: the whole image resized
  (not cropped) to C × C with C = S, plus its original (height, width). A crop box chosen in
  the original's pixel coordinates maps to a box in the canvas by the two scale factors, so
  any crop open_clip could take is still available.
- **Crop parameters** follow torchvision's ``RandomResizedCrop.get_params`` step for step
  (up to 10 tries of area × log-uniform aspect, then the central fallback), vectorised over
  the batch (:meth:`RandomResizedCrop.params`), from uniforms that are a function of
  (step key, image index) only (:func:`uniforms`).
- **Resampling**: the box is resampled to S × S with bicubic ``grid_sample`` (a = −0.75, as
  torch's tensor path of torchvision; PIL's bicubic is a = −0.5) on the training device, so
  a GPU run pays ~1 ms per batch, not the seconds the CPU would take.
- **Seeding**: each gather of a batch draws one 62-bit key from torch's global generator,
  which the Trainer seeds from the run's seed and checkpoints, so a run is reproducible and
  resumes bit-identically. Every rank of a torchrun job draws the same key for the same
  micro-step (one gather per micro-step on every rank), and an image's crop depends only on
  (key, dataset index), so N ranks see exactly the crops one process would.

Differences from open_clip's pipeline that remain: the crop is resampled from the C × C
canvas (two resamplings instead of one: a slight extra blur, largest for images much larger
than S), with torch's bicubic kernel rather than PIL's, and near the box's edge the kernel
reads the canvas's pixels outside the box where PIL reads the crop's edge pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

#: bump when the crops a (key, index) pair gives change
AUGMENT_VERSION = 2
_INDEX_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: spreads the index bits
_STREAM_STEP = np.uint64(0xBF58476D1CE4E5B9)


def uniforms(key: int, indices: np.ndarray, count: int) -> np.ndarray:
    """(N, count) uniforms in [0, 1): row i a function of (key, indices[i]) only.

    A counter-based generator (SplitMix64's finaliser over key ⊕ index·φ + j·c): the
    numbers of one image do not depend on which other images share its batch, and a whole
    batch is drawn in a few vectorised operations instead of a generator per image.
    """
    with np.errstate(over="ignore"):
        base = np.uint64(key & 0xFFFFFFFFFFFFFFFF) ^ (indices.astype(np.uint64) * _INDEX_MIX)
        z = base[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None] * _STREAM_STEP
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's RandomResizedCrop parameters; open_clip's training values by default."""

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10

    def draws(self) -> int:
        """Uniforms per image: two per attempt, two for the position."""
        return 2 * self.attempts + 2

    def params(self, heights: np.ndarray, widths: np.ndarray,
               draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(top, left, h, w) of one crop per image, given each image's :meth:`draws` uniforms.

        torchvision's ``get_params``, vectorised over images: up to ``attempts`` draws of a
        target area (uniform in ``scale`` × area) and an aspect ratio (log-uniform in
        ``ratio``), the first whose box fits wins, at a uniform position; if none fits, the
        whole image clipped to the nearest allowed aspect ratio, centred. Sides are rounded
        half to even, as Python's ``round`` in torchvision.
        """
        heights = np.asarray(heights, dtype=np.int64)
        widths = np.asarray(widths, dtype=np.int64)
        area = (heights * widths).astype(np.float64)[:, None]
        tries = self.attempts
        target = area * (self.scale[0] + draws[:, 0:2 * tries:2] * (self.scale[1] - self.scale[0]))
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = np.exp(log_low + draws[:, 1:2 * tries:2] * (log_high - log_low))
        w = np.round(np.sqrt(target * aspect)).astype(np.int64)
        h = np.round(np.sqrt(target / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
        first = fits.argmax(axis=1)
        rows = np.arange(len(heights))
        found = fits[rows, first]
        h, w = np.where(found, h[rows, first], 0), np.where(found, w[rows, first], 0)
        # the fallback: whole image, clipped to the nearest allowed aspect ratio, centred
        in_ratio = widths / heights
        narrow, wide = in_ratio < min(self.ratio), in_ratio > max(self.ratio)
        fallback_w = np.where(wide, np.round(heights * max(self.ratio)), widths).astype(np.int64)
        fallback_h = np.where(narrow, np.round(widths / min(self.ratio)), heights).astype(np.int64)
        h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
        top = np.where(found, np.floor(draws[:, -2] * (heights - h + 1)), (heights - h) // 2)
        left = np.where(found, np.floor(draws[:, -1] * (widths - w + 1)), (widths - w) // 2)
        return top.astype(np.int64), left.astype(np.int64), h, w

    def to_dict(self) -> dict[str, object]:
        return {"kind": "random_resized_crop", "scale": list(self.scale),
                "ratio": list(self.ratio), "attempts": self.attempts,
                "version": AUGMENT_VERSION}


#: training augmentations by name (the CLI's --augment): open_clip's, or none (centre crops)
TRAIN_AUGMENTATIONS: dict[str, RandomResizedCrop | None] = {
    "random-resized-crop": RandomResizedCrop(),
    "none": None,
}


def get_augmentation(name: str) -> RandomResizedCrop | None:
    try:
        return TRAIN_AUGMENTATIONS[name]
    except KeyError:
        raise KeyError(f"unknown training augmentation {name!r}; choose from "
                       f"{sorted(TRAIN_AUGMENTATIONS)}") from None


def draw_key() -> int:
    """One step's augmentation key, from torch's global generator (seeded, checkpointed)."""
    return int(torch.randint(0, 1 << 62, (1,)))


def crop_grid(boxes: Tensor, canvas: int, size: int) -> Tensor:
    """``grid_sample`` coordinates that resample each canvas box to ``size`` × ``size``.

    ``boxes`` (N, 4) as (x0, y0, x1, y1) in canvas pixels (edges, not centres); the grid is
    built on their device and in float32. Output pixel k's centre (k + ½)/size of the box
    lands at x0 + (k + ½)(x1 − x0)/size, normalised for ``align_corners=False`` as
    2x/canvas − 1: at a whole-canvas box with size = canvas every sample falls on a pixel
    centre and the image comes back unchanged.
    """
    boxes = boxes.float()
    steps = (torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5) / size
    x = boxes[:, 0:1] + steps[None] * (boxes[:, 2:3] - boxes[:, 0:1])
    y = boxes[:, 1:2] + steps[None] * (boxes[:, 3:4] - boxes[:, 1:2])
    x, y = 2 * x / canvas - 1, 2 * y / canvas - 1
    return torch.stack([x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)],
                       dim=-1)


def resample_boxes(canvases: Tensor, boxes: Tensor, size: int) -> Tensor:
    """uint8 (N, 3, size, size): each canvas's box, bicubic, rounded back to uint8.

    Everything happens on the canvases' device: only the (N, 4) boxes cross from the CPU.
    """
    grid = crop_grid(boxes.to(canvases.device), canvases.shape[-1], size)
    out = F.grid_sample(canvases.float(), grid, mode="bicubic", padding_mode="border",
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class RandomCropTrainSet(Dataset):
    """A training split of canvases whose batches come out randomly cropped (module doc).

    ``canvases`` uint8 (N, 3, C, C), ``sizes`` (N, 2) original (height, width), ``labels``
    (N,). ``tensors`` mirrors a TensorDataset so that the Trainer gathers a whole batch at
    once (``tensors[0][indices]``): that gather draws the step's key and returns the crops,
    computed on ``device`` (the training device) when given.
    """

    def __init__(self, canvases: Tensor, sizes: Tensor, labels: Tensor, size: int,
                 crop: RandomResizedCrop, device: torch.device | str | None = None) -> None:
        if canvases.ndim != 4 or canvases.shape[-1] != canvases.shape[-2]:
            raise ValueError(f"canvases must be (N, 3, C, C), got {tuple(canvases.shape)}")
        if not (len(canvases) == len(sizes) == len(labels)):
            raise ValueError(f"{len(canvases)} canvases, {len(sizes)} sizes, "
                             f"{len(labels)} labels")
        self.canvases, self.sizes, self.labels = canvases, sizes, labels
        self.size, self.crop = int(size), crop
        self.device = torch.device(device) if device is not None else None
        self.tensors = (_CroppingView(self), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def boxes(self, indices: Sequence[int], key: int) -> Tensor:
        """(N, 4) canvas boxes (x0, y0, x1, y1) of these images' crops for step ``key``."""
        index = np.asarray(indices, dtype=np.int64)
        sizes = self.sizes[torch.from_numpy(index)].numpy()
        heights, widths = sizes[:, 0], sizes[:, 1]
        top, left, h, w = self.crop.params(heights, widths,
                                           uniforms(key, index, self.crop.draws()))
        canvas = self.canvases.shape[-1]
        sx, sy = canvas / widths, canvas / heights
        return torch.from_numpy(np.stack([left * sx, top * sy, (left + w) * sx,
                                          (top + h) * sy], axis=1))

    def gather(self, indices: Tensor | Sequence[int], key: int) -> Tensor:
        """The crops of ``indices`` for step ``key``: a pure function of its arguments."""
        index_list = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor)
                                       else indices)]
        canvases = self.canvases[torch.as_tensor(index_list, dtype=torch.long)]
        if self.device is not None:
            canvases = canvases.to(self.device, non_blocking=True)
        return resample_boxes(canvases, self.boxes(index_list, key), self.size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One image under a crop keyed from the global generator (item-by-item loaders)."""
        return self.gather([index], draw_key())[0], int(self.labels[index])


class _CroppingView:
    """``dataset.tensors[0]``: indexing it with a batch of indices crops that batch."""

    def __init__(self, dataset: RandomCropTrainSet) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1)
        return self.dataset.gather(indices, draw_key())
