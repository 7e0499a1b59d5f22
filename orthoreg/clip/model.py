"""open_clip ViT image encoders from local weights, and frozen zero-shot heads.

The paper's CLIP recipe (Liu et al. 2026, after Ilharco et al. 2023) fine-tunes CLIP's image
encoder with each task's *zero-shot* classifier frozen on top: the head is built once from
the text tower — class names in prompt templates — and never trains, so a task vector
changes only the image encoder and vectors of different tasks can be added.

- :func:`load_clip` builds an open_clip model with ``create_model(name, pretrained=None)``
  (no download, ever) and loads a local checkpoint: safetensors, or open_clip's own
  ``torch.save`` format read with ``torch.load(weights_only=True)`` (no code runs on load).
  OpenAI's weights were trained with QuickGELU: use a ``-quickgelu`` config name or
  ``quick_gelu=True``; with plain GELU they load without error but compute another network.
- :class:`CLIPVisionBackbone` is the image tower as the paradigms expect it:
  ``forward(x) → image features``, ``mean``/``std``/``image_size``, and parameter names
  ``visual.<open_clip name>`` — the full CLIP checkpoint's own keys, so a task vector can be
  added to an open_clip checkpoint directly. Its residual blocks' attention is
  ``visual.transformer.resblocks.<i>.attn`` (an ``nn.MultiheadAttention``), which is what
  the ``vit_attention`` presets of ``partial`` and ``lora`` select.
- :class:`ZeroShotHead`: ``logits = scale · normalize(f) @ Wᵀ``; W's rows are class
  embeddings (normalised per template, averaged, renormalised), ``scale`` is CLIP's
  learned logit scale ``exp(logit_scale)``. Built by :func:`build_zeroshot_head`, cached on
  disk by :func:`zeroshot_head` under a fingerprint of (weights, model, templates, names).

Requires the ``clip`` extra (open_clip_torch, torchvision); see docs/CLIP.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from orthoreg.errors import OrthoRegError
from orthoreg.heads import ZeroShotHead, zeroshot_weights
from orthoreg.utils.io import OrthoRegFileError

#: OpenAI CLIP's normalisation, open_clip's default for its ViTs
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingDependency(OrthoRegError, ImportError):
    """The ``clip`` extra is not installed in this environment."""


class WeightsError(OrthoRegFileError):
    """The weights file is missing, unreadable, or does not fit the model config."""


def require_open_clip() -> Any:
    """open_clip, or an error that says which environment has it."""
    try:
        import open_clip
    except ImportError as exc:
        raise MissingDependency(
            f"the CLIP recipe needs open_clip ({exc}); it lives in a separate venv because "
            "open_clip needs torchvision: run `bash scripts/clip_env.sh --setup-only` and use "
            ".venv-clip/bin/python (or .venv-clip/bin/orthoreg); see docs/CLIP.md"
        ) from exc
    return open_clip


def resolve_model_name(name: str) -> str:
    """An open_clip config name; a path to a ``.json`` config is registered first.

    open_clip knows its built-in configs by name; a local JSON file (``embed_dim``,
    ``vision_cfg``, ``text_cfg``, as in open_clip's ``model_configs/``) is added with
    ``open_clip.add_model_config`` and then known by its file stem. This is how a custom
    architecture — or the tests' tiny ViT — reaches every process of a torchrun job.
    """
    open_clip = require_open_clip()
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise WeightsError(f"model config file {path} not found")
        open_clip.add_model_config(path)
        name = path.stem
    if open_clip.get_model_config(name) is None:
        known = [m for m in open_clip.list_models() if m.startswith("ViT")]
        raise WeightsError(f"unknown open_clip model config {name!r}; ViT configs: "
                           f"{', '.join(known[:16])}, … (or pass a .json config file)")
    return name


def model_image_size(name: str) -> int:
    """The input resolution of an open_clip config (what images are cropped to)."""
    config = require_open_clip().get_model_config(resolve_model_name(name))
    size = config["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


# ------------------------------------------------------------------------------- weights
_HASHES: dict[tuple[str, int, int], str] = {}


def require_weights_file(path: str | os.PathLike[str]) -> Path:
    """The path, if it is a file; otherwise the error that says weights are never fetched."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} not found: the CLIP recipe never downloads weights; pass a "
            "local open_clip checkpoint (safetensors, or a torch.save state dict) as --weights"
        )
    return path


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file (first 16 hex digits), memoised per (path, size, mtime).

    A content hash, not size+mtime, so that a copied checkpoint keeps its heads' cache and
    its vectors' provenance; it costs one read of the file (≈ 1 s per GB).
    """
    resolved = require_weights_file(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size <= path.stat().st_size - 8 and head[8:9] == b"{"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name
                   for name in archive.namelist())


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A CLIP state dict from a local file, without executing anything from it.

    Accepted: safetensors (detected by content, whatever the suffix), or a ``torch.save``
    file of tensors (open_clip's ``.pt``/``.bin``; ``{"state_dict": …}`` and DDP's
    ``module.`` prefix are unwrapped). TorchScript archives (OpenAI's original ``.pt``) are
    refused: loading one runs its code; convert it once with open_clip in a trusted
    environment (``create_model("ViT-B-32-quickgelu", pretrained=PATH)`` then save the
    state dict as safetensors).
    """
    path = require_weights_file(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path}: corrupted safetensors file ({exc})") from exc
    elif _is_torchscript(path):
        raise WeightsError(
            f"{path} is a TorchScript archive (OpenAI's original checkpoint format): loading it "
            "would run its code. Convert it once in a trusted environment to a state dict "
            "(open_clip.create_model(name + '-quickgelu', pretrained=PATH).state_dict(), "
            "saved with safetensors) and pass that file"
        )
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # torch.load hands a ``*.safetensors`` name to safetensors, which raises its own
        # error type for a file that is not one
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError,
                SafetensorError) as exc:
            raise WeightsError(
                f"{path}: not a safetensors file nor a torch.save state dict of tensors "
                f"(weights_only=True refuses pickled code) — {exc}"
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def no_text_download(open_clip: Any) -> dict[str, bool]:
    """Keep configs with a Hugging Face text tower from fetching its weights (offline).

    open_clip 3 calls the flag ``pretrained_text``; 2.x called it ``pretrained_hf``.
    """
    parameters = inspect.signature(open_clip.create_model).parameters
    return {"pretrained_text": False} if "pretrained_text" in parameters else {
        "pretrained_hf": False}


def load_clip(name: str, weights: str | os.PathLike[str], quick_gelu: bool = False) -> nn.Module:
    """An open_clip model ``name`` with the local ``weights``, in eval mode on the CPU.

    ``name`` is any open_clip config (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, their
    ``-quickgelu`` variants, or a path to a ``.json`` config: :func:`resolve_model_name`). The
    weights are read before the model is built, so a missing file fails fast.
    """
    open_clip = require_open_clip()
    state = read_weights(weights)
    config_name = resolve_model_name(name)
    # open_clip logs "initialized randomly" for pretrained=None; the weights follow below
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(config_name, pretrained=None,
                                       force_quick_gelu=quick_gelu, **no_text_download(open_clip))
    finally:
        logging.disable(previous)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise WeightsError(f"{weights} does not fit open_clip model {name!r} (wrong --model?): "
                           f"{str(exc).splitlines()[-1].strip()}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{weights} does not fit open_clip model {name!r}: {len(result.missing_keys)} "
            f"missing keys (first: {result.missing_keys[:3]}), {len(result.unexpected_keys)} "
            f"unexpected (first: {result.unexpected_keys[:3]}); wrong --model?"
        )
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------- backbone
class CLIPVisionBackbone(nn.Module):
    """CLIP's image tower, ``forward(x) → (N, D)`` image features (before normalisation).

    Accepts float inputs already normalised with ``mean``/``std``, or uint8 images
    ``(N, 3, S, S)`` (as :mod:`orthoreg.clip.data` caches them), normalised here. The
    normalisation constants are non-persistent buffers: they move with ``.to(device)`` but
    are not part of θ0, its fingerprint, or any task vector.
    """

    def __init__(self, visual: nn.Module, name: str, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, source: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.name = name
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.feature_dim = int(getattr(visual, "output_dim", 0)) or None
        self.source = dict(source or {})
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1),
                             persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 pixels → CLIP's normalised float input."""
        x = images.to(self.pixel_mean.dtype) / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            x = self.normalize(x)
        return self.visual(x)


@dataclass(frozen=True)
class ClipModelSpec:
    """Everything that identifies θ0 of a CLIP run: config name, weights file, activation."""

    name: str
    weights: str
    quick_gelu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "quick_gelu": self.quick_gelu,
                "weights_sha256": weights_fingerprint(self.weights)}


def vision_backbone(model: nn.Module, spec: ClipModelSpec) -> CLIPVisionBackbone:
    """The image tower of a loaded CLIP model as a backbone (shares its tensors)."""
    open_clip = require_open_clip()
    # open_clip ≥ 2.23 records the weights' normalisation on the model; CLIP's otherwise
    cfg = getattr(open_clip, "get_model_preprocess_cfg", lambda _: {})(model)
    mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
    if not isinstance(getattr(model.visual, "transformer", None), nn.Module):
        raise WeightsError(f"open_clip model {spec.name!r} has no ViT image tower "
                           "(the recipe's presets name ViT attention modules)")
    return CLIPVisionBackbone(model.visual, spec.name, mean, std, source=spec.to_dict())


# ------------------------------------------------------------------------------- heads
@torch.no_grad()
def build_zeroshot_head(model: nn.Module, tokenizer: Any, classnames: Sequence[str],
                        templates: Sequence[str], device: str | torch.device = "cpu",
                        metadata: dict[str, Any] | None = None) -> ZeroShotHead:
    """Class embeddings from CLIP's text tower (:func:`orthoreg.heads.zeroshot_weights`)."""
    model = model.to(device)

    def encode(prompts: list[str]) -> Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    weight = zeroshot_weights(encode, classnames, templates)
    return ZeroShotHead(weight.cpu(), float(model.logit_scale.exp()), metadata)


def head_fingerprint(spec: ClipModelSpec, classnames: Sequence[str],
                     templates: Sequence[str]) -> str:
    """What a cached head depends on: the weights' content, config, activation, prompts."""
    record = {"weights": weights_fingerprint(spec.weights), "model": spec.name,
              "quick_gelu": spec.quick_gelu, "classnames": list(classnames),
              "templates": list(templates), "version": 1}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def zeroshot_head(model: nn.Module, spec: ClipModelSpec, task: str, classnames: Sequence[str],
                  templates: Sequence[str], cache_dir: str | os.PathLike[str] | None = None,
                  device: str | torch.device = "cpu") -> ZeroShotHead:
    """The task's head, from ``<cache>/heads/<task>-<fingerprint>.safetensors`` or built."""
    fingerprint = head_fingerprint(spec, classnames, templates)
    path = Path(cache_dir) / "heads" / f"{task}-{fingerprint}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return ZeroShotHead.load(path)
    open_clip = require_open_clip()
    tokenizer = open_clip.get_tokenizer(resolve_model_name(spec.name))
    head = build_zeroshot_head(model, tokenizer, classnames, templates, device, {
        "task": task, "fingerprint": fingerprint, "model": spec.name,
        "weights_sha256": weights_fingerprint(spec.weights), "quick_gelu": spec.quick_gelu,
        "classnames": list(classnames), "templates": list(templates),
    })
    if path is not None:
        head.save(path)
    return head
