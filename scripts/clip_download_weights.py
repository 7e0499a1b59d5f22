#!/usr/bin/env python3
"""Fetch OpenAI's CLIP weights once and store them as safetensors for the CLIP recipe.

Runs only where the network is reachable (never in CI, never on the offline machines the
recipe trains on): open_clip downloads OpenAI's checkpoint, builds the model with
QuickGELU (as OpenAI trained it), and this script saves its state dict as
``<out>/<model>-openai.safetensors`` — the file ``orthoreg finetune --weights`` and
``orthoreg clip reproduce --weights-dir`` read — and prints its sha256, which every run
records. Copy the files to the training machine; nothing else is needed there.

    .venv-clip/bin/python scripts/clip_download_weights.py --out weights
    .venv-clip/bin/python scripts/clip_download_weights.py --model ViT-B-32 ViT-B-16 ViT-L-14

Sizes: ViT-B/32 ≈ 0.6 GB, ViT-B/16 ≈ 0.6 GB, ViT-L/14 ≈ 1.7 GB (fp32).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: str, out: Path, cache: str | None) -> Path:
    """OpenAI's ``model`` through open_clip, saved as safetensors (atomically)."""
    import open_clip
    from safetensors.torch import save_file

    clip = open_clip.create_model(f"{model}-quickgelu", pretrained="openai", cache_dir=cache)
    state = {name: tensor.detach().contiguous().cpu()
             for name, tensor in clip.state_dict().items()}
    target = out / f"{model}-openai.safetensors"
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file(state, str(partial), metadata={"source": f"open_clip {model}-quickgelu openai"})
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["ViT-B-32"], choices=MODELS)
    parser.add_argument("--out", default="weights", help="folder for the .safetensors files")
    parser.add_argument("--cache", help="open_clip download cache (default: its own)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        path = fetch(model, out, args.cache)
        print(f"{path}  sha256 {sha256(path)}  ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
