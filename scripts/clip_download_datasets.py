#!/usr/bin/env python3
"""Export the CLIP recipe's 8 datasets (and link ImageNet) into its local folder layout.

Runs only where the network is reachable (never in CI, never on the offline training
machines): it reads each task from the Hugging Face Hub with ``datasets`` (``pip install
datasets`` in any environment) and writes

    <root>/<Task>/{train,test}/<class name>/<index>.png

which is what ``orthoreg finetune --data-root`` and ``orthoreg clip reproduce`` read
(docs/CLIP.md §3). The repositories are the ones FusionBench uses for these eight tasks
(its CLIP-ViT "TA8" models list them); check the split sizes this prints against the
paper's before trusting a run.

    python scripts/clip_download_datasets.py --root data            # the 8 tasks
    python scripts/clip_download_datasets.py --root data --tasks DTD EuroSAT
    python scripts/clip_download_datasets.py --root data --tasks ImageNet \\
        --imagenet-dir /datasets/imagenet     # train/<wnid>/…, val/<wnid>/… (licensed; manual)

Class folders are the datasets' class names ("/" → "-"): the recipe's built-in tables
(EuroSAT, GTSRB, DTD, RESISC45, digits) map those names to prompts when they are the
original folder names; otherwise the names themselves are the prompts. A task whose folder
already holds both splits is skipped (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

#: task → (Hub repository, configuration or None)
HUB_SOURCES: dict[str, tuple[str, str | None]] = {
    "Cars": ("tanganke/stanford_cars", None),
    "DTD": ("tanganke/dtd", None),
    "EuroSAT": ("tanganke/eurosat", None),
    "GTSRB": ("tanganke/gtsrb", None),
    "MNIST": ("ylecun/mnist", None),
    "RESISC45": ("tanganke/resisc45", None),
    "SUN397": ("tanganke/sun397", None),
    "SVHN": ("ufldl-stanford/svhn", "cropped_digits"),
}


def folder_name(name: str) -> str:
    return str(name).replace("/", "-").strip() or "_"


def columns(features: object) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names) of a Hub dataset's features."""
    from datasets import ClassLabel, Image

    image = next(k for k, v in features.items() if isinstance(v, Image))  # type: ignore[attr-defined]
    label = next((k for k, v in features.items() if isinstance(v, ClassLabel)), None)  # type: ignore[attr-defined]
    if label is None:
        label = next(k for k in ("label", "labels") if k in features)  # type: ignore[operator]
        return image, label, None
    return image, label, list(features[label].names)  # type: ignore[index]


def export_task(task: str, root: Path, cache: str | None, force: bool) -> None:
    from datasets import load_dataset

    target = root / task
    if not force and (target / "train").is_dir() and (target / "test").is_dir():
        print(f"{task}: {target} already holds train/ and test/ (use --force to redo)")
        return
    repository, config = HUB_SOURCES[task]
    splits = load_dataset(repository, config, cache_dir=cache)
    staging = root / f".{task}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    counts = {}
    for split in ("train", "test"):
        if split not in splits:
            raise SystemExit(f"{task}: {repository} has no {split!r} split "
                             f"(has: {', '.join(splits)})")
        data = splits[split]
        image_key, label_key, names = columns(data.features)
        for index, row in enumerate(data):
            label = row[label_key]
            folder = staging / split / folder_name(names[label] if names else label)
            folder.mkdir(parents=True, exist_ok=True)
            row[image_key].convert("RGB").save(folder / f"{index:06d}.png")
        counts[split] = len(data)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"{task}: {repository} → {target} (train {counts['train']}, test {counts['test']})")


def link_imagenet(root: Path, imagenet: Path) -> None:
    """<root>/ImageNet/train → <imagenet>/train, test → <imagenet>/val (class folders)."""
    for source in ("train", "val"):
        folder = imagenet / source
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise SystemExit(f"ImageNet: {folder} must hold one folder per class (wnid); the "
                             "official validation images need sorting into class folders")
    target = root / "ImageNet"
    target.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", "train"), ("test", "val")):
        link = target / split
        if link.is_symlink() or link.exists():
            print(f"ImageNet: {link} exists, left as is")
            continue
        link.symlink_to((imagenet / source).resolve(), target_is_directory=True)
    print(f"ImageNet: {target} → {imagenet} (the recipe decodes 5000 train + the test images)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the recipe's --data-root")
    parser.add_argument("--tasks", nargs="+", default=list(HUB_SOURCES),
                        choices=[*HUB_SOURCES, "ImageNet"])
    parser.add_argument("--imagenet-dir", type=Path,
                        help="a licensed ImageNet-1k copy with train/<wnid>/ and val/<wnid>/")
    parser.add_argument("--cache", help="Hugging Face datasets cache (default: its own)")
    parser.add_argument("--force", action="store_true", help="re-export existing tasks")
    args = parser.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        if task == "ImageNet":
            if args.imagenet_dir is None:
                raise SystemExit("ImageNet is licensed and not on the Hub in this layout: "
                                 "download ILSVRC2012 from image-net.org, then pass "
                                 "--imagenet-dir")
            link_imagenet(root, args.imagenet_dir)
        else:
            export_task(task, root, args.cache, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
