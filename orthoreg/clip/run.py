"""CLIP runs: fine-tune one task (single process or torchrun), evaluate runs together.

A *run directory* is what :func:`finetune_task` leaves behind and what the evaluations read:

    <out>/run.json            the record: model (config, weights path and sha256, QuickGELU),
                              task, classes, split hashes, paradigm and options, precision,
                              training augmentation, the resolved TrainConfig, zero-shot and
                              fine-tuned val/test accuracy, history
    <out>/vector.safetensors  the task vector τ in the image tower's parameter names
    <out>/head.safetensors    the task's frozen zero-shot head

Distributed training (``torchrun --nproc_per_node N -m orthoreg finetune …``): every rank
builds the same θ0 and head, takes its slice of each global batch (``batch_indices``), and
the Trainer averages gradients across ranks before clipping, so N processes follow the
trajectory of one process with the same global batch. NCCL on GPUs (one per local rank),
gloo on CPUs. Rank 0 alone decodes images into the cache, builds heads, checkpoints and
writes the run directory; the others wait at barriers.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orthoreg.clip.augment import get_augmentation
from orthoreg.clip.data import ClipTaskData, load_task
from orthoreg.clip.model import (
    ClipModelSpec,
    CLIPVisionBackbone,
    ZeroShotHead,
    load_clip,
    model_image_size,
    vision_backbone,
    weights_fingerprint,
    zeroshot_head,
)
from orthoreg.clip.recipe import (
    DEFAULT_PRECISION,
    PENALTY_MATRICES,
    autocast_for,
    build_paradigm,
    train_config,
)
from orthoreg.clip.templates import CONTROL_TASK, base_task_name
from orthoreg.errors import OrthoRegError
from orthoreg.taskvector import TaskVector
from orthoreg.training import TrainConfig
from orthoreg.utils.io import OrthoRegFileError, atomic_write_json
from orthoreg.utils.provenance import provenance, seed_everything

RUN_KIND = "orthoreg.clip_run"
RUN_FILE, VECTOR_FILE, HEAD_FILE = "run.json", "vector.safetensors", "head.safetensors"


def default_cache() -> Path:
    """Where decoded images and heads are cached: ``$ORTHOREG_CACHE`` or ~/.cache/orthoreg."""
    root = os.environ.get("ORTHOREG_CACHE") or Path.home() / ".cache" / "orthoreg"
    return Path(root) / "clip"


# ------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            if self.device.type == "cuda":
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def distributed(requested_device: str | None = None) -> Iterator[Dist]:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else run alone.

    The process group is created here and destroyed on exit only if this call created it;
    a caller that already initialised one (tests with ``mp.spawn``) keeps ownership.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    owned = False
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(requested_device)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        # generous timeout: the other ranks wait at a barrier while rank 0 decodes a whole
        # dataset into the cache the first time (minutes for SUN397 or the ImageNet control)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2),
                                **({"device_id": device} if device.type == "cuda" else {}))
        owned = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        device = pick_device(requested_device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, world, device = 0, 1, pick_device(requested_device)
    try:
        yield Dist(rank, world, device)
    finally:
        if owned:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tuning run of the CLIP recipe; ``None`` means "the recipe's value"."""

    model: str
    weights: str
    data_root: str
    task: str
    out: str
    paradigm: str = "full"
    lam: float = 0.0
    squared: bool = False
    quick_gelu: bool = False
    seed: int = 0
    epochs: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    accumulation: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None
    lora_rank: int = 8
    lora_alpha: float = 8.0
    cache: str | None = None
    device: str | None = None
    #: "fp32" (the authors') or "bf16" (autocast on CUDA; fp32 on CPU either way)
    precision: str = DEFAULT_PRECISION
    #: training augmentation (orthoreg.clip.augment): open_clip's, or "none" (centre crops)
    augment: str = "random-resized-crop"
    #: the weights the penalty covers: "2d" (the authors') or "ndim>=2" (adds conv1)
    penalty_matrices: str = PENALTY_MATRICES
    eval_batch_size: int = 256
    workers: int | None = None
    progress: bool = True
    checkpoint_every: int = 200

    def model_spec(self) -> ClipModelSpec:
        """Paths made absolute: the run record must still find them from another cwd."""
        model = str(Path(self.model).resolve()) if self.model.endswith(".json") else self.model
        return ClipModelSpec(model, str(Path(self.weights).resolve()), self.quick_gelu)

    def paradigm_options(self) -> dict[str, Any]:
        return {"rank": self.lora_rank, "alpha": self.lora_alpha} if self.paradigm == "lora" else {}


def _spec_key(record: Mapping[str, Any]) -> str:
    fields = {k: record[k] for k in ("task", "paradigm", "paradigm_options", "train")}
    if record.get("augmentation") is not None:  # runs without one keep their old keys
        fields["augmentation"] = record["augmentation"]
    fields["model"] = {k: record["model"][k] for k in ("name", "weights_sha256", "quick_gelu")}
    fields["splits"] = record["data"]["split_hashes"]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_model_and_head(spec: ClipModelSpec, data: ClipTaskData, cache: Path,
                         dist: Dist) -> tuple[CLIPVisionBackbone, ZeroShotHead]:
    """θ0's image tower and the task's head; rank 0 builds the head into the cache first."""
    clip = load_clip(spec.name, spec.weights, spec.quick_gelu)
    head = None
    if dist.is_writer:
        head = zeroshot_head(clip, spec, data.name, data.classnames, data.spec.templates,
                             cache, dist.device)
    dist.barrier()
    if head is None:
        head = zeroshot_head(clip, spec, data.name, data.classnames, data.spec.templates,
                             cache, dist.device)
    backbone = vision_backbone(clip.cpu(), spec)
    del clip  # the text tower has served its purpose; only the image tower stays alive
    return backbone, head


def finetune_task(spec: FinetuneSpec) -> dict[str, Any] | None:
    """Fine-tune ``spec.task`` and write the run directory; returns its record on rank 0.

    Rerunning a finished run with the same settings returns the stored record; an
    interrupted one resumes from its checkpoint (the Trainer's, bit-identical on CPU).
    """
    from orthoreg.evaluation import accuracy
    from orthoreg.training import finetune

    out = Path(spec.out)
    cache = Path(spec.cache) if spec.cache else default_cache()
    model_spec = spec.model_spec()
    augmentation = get_augmentation(spec.augment)
    with distributed(spec.device) as dist:
        started = time.perf_counter()
        # the crop size is the config's: images are decoded before the weights are read
        size = model_image_size(model_spec.name)
        data = load_task(spec.data_root, spec.task, size, cache, ("train", "val", "test"),
                         workers=spec.workers, progress=spec.progress and dist.is_writer,
                         barrier=dist.barrier, writer=dist.is_writer,
                         augmentation=augmentation, device=dist.device)
        cfg = resolve_train_config(spec, data.name, len(data.train), dist.device)
        record = {
            "kind": RUN_KIND, "task": data.name, "model": model_spec.to_dict(),
            "paradigm": spec.paradigm, "paradigm_options": spec.paradigm_options(),
            "lambda": spec.lam, "squared": spec.squared, "precision": spec.precision,
            "augmentation": augmentation.to_dict() if augmentation is not None else None,
            "train": cfg.resume_key(),
            "data": {"root": str(Path(spec.data_root).resolve()), "classes": list(data.classes),
                     "classnames": data.classnames, "split_hashes": data.split_hashes,
                     "sizes": {s: len(d) for s, d in data.splits.items()},
                     "templates": list(data.spec.templates)},
        }
        record["key"] = _spec_key(record)
        finished = _finished_record(out, record["key"])
        if finished is not None:
            return finished if dist.is_writer else None

        backbone, head = _load_model_and_head(model_spec, data, cache, dist)
        pristine = copy.deepcopy(backbone) if dist.is_writer else None
        seed_everything(spec.seed)
        model = build_paradigm(spec.paradigm, spec.paradigm_options()).prepare(backbone)
        model.to(dist.device)
        head = head.to(dist.device).eval().requires_grad_(False)
        result = finetune(model, head, data.train, cfg, workdir=out)
        dist.barrier()
        if not dist.is_writer:
            return None
        model.eval()
        vector = model.task_vector({"task": data.name, "lambda": spec.lam, "lr": cfg.lr,
                                    "seed": spec.seed, "squared": spec.squared,
                                    "steps": cfg.steps, "model": spec.model,
                                    "weights_sha256": record["model"]["weights_sha256"],
                                    **provenance(spec.seed)})
        assert pristine is not None
        pristine.to(dist.device).eval()
        batch = spec.eval_batch_size
        record["accuracy"] = {
            "finetuned": {s: accuracy(model, head, data.split(s), batch) for s in ("val", "test")},
            "zeroshot": {s: accuracy(pristine, head, data.split(s), batch) for s in ("val", "test")},
        }
        record.update({"history": result.history, "train_seconds": result.seconds,
                       "resumed_from": result.resumed_from, "world_size": dist.world,
                       "device": str(dist.device), "seconds": time.perf_counter() - started,
                       "vector_norm": vector.norm(), **provenance(spec.seed)})
        vector.save(out / VECTOR_FILE)
        head.cpu().save(out / HEAD_FILE)
        atomic_write_json(out / RUN_FILE, record)
        (out / "checkpoint.safetensors").unlink(missing_ok=True)  # the vector supersedes it
        return record


def resolve_train_config(spec: FinetuneSpec, task: str, train_size: int,
                         device: torch.device) -> TrainConfig:
    """The recipe's TrainConfig for ``spec`` on ``device``: what the run records and keys.

    bf16 autocast only where ``spec.precision`` asks for it *and* the device is CUDA (the
    Trainer autocasts nothing elsewhere, so the record says what actually ran).
    """
    cfg = train_config(
        task, spec.model, spec.paradigm, train_size, spec.lam,
        epochs=spec.epochs, steps=spec.steps, batch_size=spec.batch_size,
        accumulation=spec.accumulation, lr=spec.lr, squared=spec.squared, seed=spec.seed,
        amp=autocast_for(spec.precision) and device.type == "cuda", progress=spec.progress,
        checkpoint_every=spec.checkpoint_every, matrices=spec.penalty_matrices,
        **{k: v for k, v in (("weight_decay", spec.weight_decay),
                             ("warmup_steps", spec.warmup_steps),
                             ("grad_clip", spec.grad_clip)) if v is not None},
    )
    return replace(cfg, grad_clip=None) if cfg.grad_clip == 0 else cfg


def _finished_record(out: Path, key: str) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key:
        raise OrthoRegError(f"{out} already holds a different run (task {record.get('task')!r}, "
                            f"paradigm {record.get('paradigm')!r}); use another --out")
    if not (out / VECTOR_FILE).is_file():
        return None
    return record


# ------------------------------------------------------------------------------- runs
@dataclass
class ClipRun:
    """A finished run directory, loaded."""

    path: Path
    record: dict[str, Any]
    vector: TaskVector
    head: ZeroShotHead

    @property
    def task(self) -> str:
        return str(self.record["task"])


def load_run(path: str | os.PathLike[str]) -> ClipRun:
    """Read a run directory written by :func:`finetune_task`; clear errors for anything else."""
    folder = Path(path)
    record_path = folder / RUN_FILE
    if not record_path.is_file():
        raise OrthoRegFileError(f"{folder} is not a finished CLIP run (no {RUN_FILE}); "
                                "run `orthoreg finetune … --out DIR` first")
    record = json.loads(record_path.read_text())
    if record.get("kind") != RUN_KIND:
        raise OrthoRegFileError(f"{record_path}: not a CLIP run record")
    return ClipRun(folder, record, TaskVector.load(folder / VECTOR_FILE),
                   ZeroShotHead.load(folder / HEAD_FILE))


def check_runs(runs: Sequence[ClipRun]) -> dict[str, Any]:
    """Runs evaluated together must share θ0 and paradigm and have distinct tasks."""
    if not runs:
        raise OrthoRegError("no runs given")
    first = runs[0].record
    identity = ("name", "weights_sha256", "quick_gelu")
    for run in runs[1:]:
        for key in identity:
            if run.record["model"][key] != first["model"][key]:
                raise OrthoRegError(f"{run.path} was fine-tuned from another model ({key}: "
                                    f"{run.record['model'][key]!r} vs {first['model'][key]!r} "
                                    f"in {runs[0].path})")
        if run.record["paradigm"] != first["paradigm"]:
            raise OrthoRegError(f"{run.path} uses paradigm {run.record['paradigm']!r}, "
                                f"{runs[0].path} uses {first['paradigm']!r}")
    tasks = [run.task for run in runs]
    duplicate = next((t for t in tasks if tasks.count(t) > 1), None)
    if duplicate is not None:
        raise OrthoRegError(f"task {duplicate!r} appears in more than one run")
    return first


@dataclass(frozen=True)
class EvalOptions:
    """Where evaluation finds θ0 and data when they moved since fine-tuning."""

    data_root: str | None = None
    weights: str | None = None
    cache: str | None = None
    device: str | None = None
    batch_size: int = 256
    workers: int | None = None
    progress: bool = True


def _base_backbone(first: Mapping[str, Any], options: EvalOptions,
                   keep_text: bool = False) -> tuple[CLIPVisionBackbone, ClipModelSpec, Any]:
    model = first["model"]
    spec = ClipModelSpec(model["name"], options.weights or model["weights"], model["quick_gelu"])
    if weights_fingerprint(spec.weights) != model["weights_sha256"]:
        raise OrthoRegError(f"{spec.weights} is not the checkpoint the runs were fine-tuned "
                            f"from (sha256 {model['weights_sha256']}…)")
    clip = load_clip(spec.name, spec.weights, spec.quick_gelu)
    backbone = vision_backbone(clip, spec)
    return backbone, spec, (clip if keep_text else None)


def _task_eval(run: ClipRun, size: int, options: EvalOptions) -> Any:
    from orthoreg.evaluation import TaskEval

    root = options.data_root or run.record["data"]["root"]
    cache = Path(options.cache) if options.cache else default_cache()
    data = load_task(root, run.task, size, cache, ("val", "test"), options.workers,
                     options.progress)
    if data.classes != tuple(run.record["data"]["classes"]):
        raise OrthoRegError(f"task {run.task!r}: class folders under {root} differ from "
                            f"those {run.path} was fine-tuned on")
    return TaskEval(run.task, run.head, data.val, data.test)


def evaluate_addition(run_dirs: Sequence[str | os.PathLike[str]],
                      options: EvalOptions = EvalOptions(),
                      alphas: Sequence[float] | None = None,
                      merge: str = "task_arithmetic",
                      merge_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Task addition over the runs' vectors (DESIGN.md §2), α chosen on their val splits.

    ``alphas=None``: the merge method's reference grid (``orthoreg.merging.default_alphas``);
    ``merge_params=None``: the method's paper hyper-parameters where they differ from the
    library defaults (``orthoreg.merging.paper_params``: DARE's drop rate 0.9).
    """
    from orthoreg.evaluation import addition
    from orthoreg.merging import paper_params

    runs = [load_run(d) for d in run_dirs]
    first = check_runs(runs)
    backbone, spec, _ = _base_backbone(first, options)
    device = pick_device(options.device)
    backbone.to(device).eval().requires_grad_(False)
    tasks = {run.task: _task_eval(run, backbone.image_size, options) for run in runs}
    for evaluation in tasks.values():
        evaluation.head.to(device)
    vectors = {run.task: run.vector for run in runs}
    finetuned = {run.task: run.record["accuracy"]["finetuned"] for run in runs}
    result = addition(backbone, tasks, vectors, finetuned,
                      alphas=list(alphas) if alphas else None, merge=merge,
                      merge_params=paper_params(merge) if merge_params is None else merge_params,
                      paradigm=first["paradigm"], batch_size=options.batch_size)
    return {"kind": "orthoreg.clip_addition", "model": spec.to_dict(),
            "runs": {run.task: str(run.path) for run in runs},
            "zeroshot": {run.task: run.record["accuracy"]["zeroshot"] for run in runs},
            **result.to_dict(), **provenance()}


def evaluate_negation(run_dirs: Sequence[str | os.PathLike[str]],
                      options: EvalOptions = EvalOptions(),
                      control: str = CONTROL_TASK, alphas: Sequence[float] | None = None,
                      thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Negation θ0 − α·τ of each run's task, keeping ``control``'s accuracy (DESIGN.md §2)."""
    from orthoreg.evaluation import DEFAULT_ALPHAS, NEGATION_THRESHOLDS, TaskEval, negation

    runs = [load_run(d) for d in run_dirs]
    first = check_runs(runs)
    control = base_task_name(control)
    if control in {run.task for run in runs}:
        raise OrthoRegError(f"control task {control!r} is also a negated task")
    backbone, spec, clip = _base_backbone(first, options, keep_text=True)
    device = pick_device(options.device)
    root = options.data_root or first["data"]["root"]
    cache = Path(options.cache) if options.cache else default_cache()
    control_data = load_task(root, control, backbone.image_size, cache, ("val", "test"),
                             options.workers, options.progress)
    control_head = zeroshot_head(clip, spec, control_data.name, control_data.classnames,
                                 control_data.spec.templates, cache, device)
    del clip
    backbone.to(device).eval().requires_grad_(False)
    control_eval = TaskEval(control_data.name, control_head.to(device), control_data.val,
                            control_data.test)
    results = {}
    for run in runs:
        target = _task_eval(run, backbone.image_size, options)
        target.head.to(device)
        results[run.task] = negation(
            backbone, target, control_eval, run.vector, alphas=list(alphas or DEFAULT_ALPHAS),
            thresholds=list(thresholds or NEGATION_THRESHOLDS), paradigm=first["paradigm"],
            batch_size=options.batch_size).to_dict()
    return {"kind": "orthoreg.clip_negation", "model": spec.to_dict(), "control": control,
            "runs": {run.task: str(run.path) for run in runs}, "results": results,
            **provenance()}


def record_summary(record: Mapping[str, Any]) -> str:
    """One line per run for the CLI."""
    acc = record.get("accuracy", {})
    ft, zs = acc.get("finetuned", {}), acc.get("zeroshot", {})
    return (f"{record['task']}: {record['paradigm']} λ={record['lambda']:g} "
            f"zero-shot test {zs.get('test', float('nan')):.4f} → fine-tuned test "
            f"{ft.get('test', float('nan')):.4f} (val {ft.get('val', float('nan')):.4f}), "
            f"‖τ‖={record.get('vector_norm', float('nan')):.4g}")


__all__ = ["ClipRun", "Dist", "EvalOptions", "FinetuneSpec", "check_runs", "default_cache",
           "distributed", "evaluate_addition", "evaluate_negation", "finetune_task",
           "load_run", "record_summary"]
