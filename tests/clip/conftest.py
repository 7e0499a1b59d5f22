"""Fixtures for the CLIP recipe: a tiny random open_clip ViT and tiny image folders.

The model is a real open_clip ``CLIP`` (2-layer ViT, width 64, patch 8, 32 px; 2-layer
text tower, context 16) built from a JSON config in a temp dir and saved as safetensors,
so every test goes through ``--weights PATH`` exactly as a real checkpoint would. The data
are two tasks named ``MNIST`` and ``EuroSAT`` in the documented folder layout, three
classes each, with class-dependent colours and stripes so that fine-tuning can learn them.

open_clip lives in ``.venv-clip`` (``bash scripts/clip_env.sh``). Elsewhere the tests that
need it are skipped with that reason; with ``ORTHOREG_REQUIRE_CLIP=1`` (set by the script,
hence in CI) a missing open_clip is a failure, never a silent skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

try:
    import open_clip
except Exception as exc:  # ImportError, or torchvision failing beside this torch build
    open_clip = None
    OPEN_CLIP_ERROR = f"{type(exc).__name__}: {exc}"
else:
    OPEN_CLIP_ERROR = ""

if open_clip is None and os.environ.get("ORTHOREG_REQUIRE_CLIP"):
    raise RuntimeError(f"ORTHOREG_REQUIRE_CLIP is set but open_clip does not import "
                       f"({OPEN_CLIP_ERROR})")

needs_open_clip = pytest.mark.skipif(
    open_clip is None,
    reason="open_clip is not installed in this environment; the CLIP tests run in .venv-clip "
           "(bash scripts/clip_env.sh)",
)

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
TINY_NAME = "orthoreg-tiny-vit"
TASK_CLASSES = {"MNIST": ("0", "1", "2"), "EuroSAT": ("AnnualCrop", "Forest", "River")}
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 4


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT's config file, registered with open_clip (name: its stem)."""
    if open_clip is None:
        pytest.skip("open_clip is not installed")
    path = tmp_path_factory.mktemp("configs") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Randomly initialised (seed 0) tiny CLIP weights as a safetensors file."""
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_NAME, pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _image(label: int, index: int, rng: np.random.Generator) -> np.ndarray:
    """A 40×36 RGB image: class colour, class-dependent stripes, per-image noise."""
    height, width = 36, 40
    colours = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210]], dtype=np.float64)
    image = np.tile(colours[label], (height, width, 1))
    period = 4 + 3 * label
    stripes = ((np.arange(width) // period) % 2)[None, :, None] * 50.0
    image = image + stripes + rng.normal(0, 20, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_task(root: Path, name: str, classes: tuple[str, ...], seed: int = 0,
               train: int = TRAIN_PER_CLASS, test: int = TEST_PER_CLASS) -> Path:
    """``<root>/<name>/{train,test}/<class>/<i>.png`` with synthetic images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for label, folder in enumerate(classes):
            target = root / name / split / folder
            target.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(_image(label, index, rng)).save(target / f"{index:03d}.png")
    return root / name


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks, MNIST and EuroSAT, three classes each, in the documented layout."""
    root = tmp_path_factory.mktemp("data")
    for seed, (name, classes) in enumerate(TASK_CLASSES.items()):
        write_task(root, name, classes, seed=seed)
    return root
