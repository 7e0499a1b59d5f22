"""Timing the CLIP recipe without weights or data: random-init open_clip, synthetic images.

A step of fine-tuning costs the same whatever the weights hold, so an open_clip model of
the right config with random weights, synthetic uint8 images and zero-shot heads built
from its (random) text tower measure what a real run will cost: seconds per optimizer
step for each paradigm and precision, the OrthoReg penalty's share of it, peak GPU memory,
and evaluation throughput. ``scripts/gpu_check.sh`` (:mod:`orthoreg.clip.gpucheck`) reports
these; ``orthoreg clip reproduce`` turns them into its GPU-hours estimate.

Training goes through the real pieces: the recipe's TrainConfig, the paradigm, the
Trainer, and the training crop of :mod:`orthoreg.clip.augment` on the training device.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.clip.augment import RandomCropTrainSet, RandomResizedCrop
from orthoreg.clip.model import (
    CLIPVisionBackbone,
    ZeroShotHead,
    build_zeroshot_head,
    no_text_download,
    require_open_clip,
    resolve_model_name,
)
from orthoreg.clip.recipe import autocast_for, build_paradigm, train_config

#: steps left out of a timing: allocator warm-up, cuDNN/cuBLAS heuristics, lazy inits
WARMUP_STEPS = 2


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs "initialized randomly" for pretrained=None: here that is the point."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def random_clip(name: str, seed: int = 0) -> nn.Module:
    """An open_clip model of config ``name`` with random weights (seeded), in eval mode."""
    open_clip = require_open_clip()
    config = resolve_model_name(name)
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(seed)
        model = open_clip.create_model(config, pretrained=None, **no_text_download(open_clip))
    return model.eval().requires_grad_(False)


def random_parts(name: str, classes: int = 10, seed: int = 0,
                 device: torch.device | str = "cpu") -> tuple[CLIPVisionBackbone, ZeroShotHead]:
    """The image tower of a random ``name`` and a zero-shot head from its random text tower."""
    open_clip = require_open_clip()
    clip = random_clip(name, seed)
    tokenizer = open_clip.get_tokenizer(resolve_model_name(name))
    head = build_zeroshot_head(clip, tokenizer, [f"class {i}" for i in range(classes)],
                               ("a photo of a {}.",), device,
                               {"task": "synthetic", "model": name, "random_init_seed": seed})
    clip.cpu()
    backbone = CLIPVisionBackbone(clip.visual, name,
                                  source={"name": name, "weights": None, "random_init_seed": seed})
    return backbone, head


def synthetic_train_set(count: int, size: int, classes: int, seed: int = 0,
                        device: torch.device | str | None = None) -> RandomCropTrainSet:
    """Random uint8 canvases with 4:3 "originals", cropped per step as in a real run."""
    generator = torch.Generator().manual_seed(seed)
    canvases = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                             generator=generator)
    sizes = torch.tensor([[3 * size, 4 * size]] * count)
    labels = torch.arange(count) % classes
    return RandomCropTrainSet(canvases, sizes, labels, size, RandomResizedCrop(), device)


def synthetic_eval_set(count: int, size: int, classes: int, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                           generator=generator)
    return TensorDataset(images, torch.arange(count) % classes)


@dataclass(frozen=True)
class StepTiming:
    """How a few optimizer steps of one configuration went."""

    paradigm: str
    precision: str
    lam: float
    steps: int
    batch_size: int
    seconds_per_step: float  # median over the steps after the warm-up ones
    peak_memory_bytes: int | None  # CUDA only
    final_loss: float
    finite: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(backbone: CLIPVisionBackbone, head: ZeroShotHead, data: RandomCropTrainSet,
                  paradigm: str, lam: float, precision: str, steps: int, batch_size: int,
                  device: torch.device, model: str = "ViT-B-32",
                  **overrides: Any) -> StepTiming:
    """``steps`` recipe steps of ``paradigm`` on a copy of ``backbone``; the median step time.

    The first :data:`WARMUP_STEPS` steps are run but not timed (all of them when there are
    no more). ``overrides`` are further TrainConfig fields.
    """
    from orthoreg.training import finetune

    config = train_config("synthetic", model, paradigm, len(data), lam, steps=steps,
                          batch_size=batch_size, accumulation=1, warmup_steps=0,
                          amp=autocast_for(precision) and device.type == "cuda",
                          progress=False, log_every=1,
                          # per-step logging is for the clock; the regime's SVDs would
                          # be timed with it
                          track_regime=False, **overrides)
    trainee = build_paradigm(paradigm).prepare(copy.deepcopy(backbone)).to(device)
    head = head.to(device).eval().requires_grad_(False)
    stamps: list[float] = []
    losses: list[float] = []

    def on_log(record: dict[str, float]) -> None:
        _synchronize(device)
        stamps.append(time.perf_counter())
        losses.append(float(record["loss"]))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    stamps.append(time.perf_counter())
    finetune(trainee, head, data, config, on_log=on_log)
    durations = [b - a for a, b in itertools.pairwise(stamps)]
    timed = durations[WARMUP_STEPS:] or durations
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    del trainee
    if device.type == "cuda":
        torch.cuda.empty_cache()
    final = losses[-1] if losses else float("nan")
    return StepTiming(paradigm, precision, lam, steps, batch_size,
                      statistics.median(timed), peak, final,
                      all(torch.isfinite(torch.tensor(losses)).tolist()))


def eval_images_per_second(backbone: CLIPVisionBackbone, head: ZeroShotHead,
                           data: TensorDataset, device: torch.device,
                           batch_size: int = 256) -> float:
    """Forward-only throughput (images/s) of the fp32 evaluation path, after one warm-up pass."""
    from orthoreg.evaluation import accuracy

    model = copy.deepcopy(backbone).to(device)
    head = head.to(device)
    accuracy(model, head, data, batch_size)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    accuracy(model, head, data, batch_size)
    _synchronize(device)
    return len(data) / max(time.perf_counter() - started, 1e-9)
