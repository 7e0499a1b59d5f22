"""``orthoreg finetune`` and ``orthoreg evaluate``: the paper's CLIP recipe (docs/CLIP.md).

Registering the commands imports nothing heavy: open_clip is imported when one runs, and a
missing ``clip`` extra is a one-line error naming the venv that has it.

    orthoreg finetune --model ViT-B-32 --weights W.safetensors --data-root DATA \\
        --task Cars --paradigm full --lam 10 --out runs/Cars
    torchrun --nproc_per_node 4 -m orthoreg finetune … (same arguments)
    orthoreg evaluate addition --run runs/Cars runs/DTD … [--out addition.json]
    orthoreg evaluate negation --run runs/Cars … --control ImageNet
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orthoreg.cli.registry import UsageError, command

PARADIGM_CHOICES = ("full", "linear", "partial", "lora")


def _configure_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="open_clip config name: ViT-B-32, ViT-B-16, ViT-L-14, … "
                        "(OpenAI weights: the -quickgelu name or --quick-gelu)")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="local checkpoint (safetensors, or an open_clip torch.save state dict)")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="folder holding <Task>/{train,test}/<class>/<images>")
    p.add_argument("--task", required=True,
                   help="Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN (…Val "
                        "accepted: training always excludes the held-out val split), or any "
                        "folder name under --data-root")
    p.add_argument("--paradigm", choices=PARADIGM_CHOICES, default="full")
    p.add_argument("--lam", type=float, default=0.0, help="OrthoReg λ (0: the baseline)")
    p.add_argument("--squared", action="store_true",
                   help="the paper text's squared penalty ‖G−I‖²_F (default: the code's ‖G−I‖_F)")
    p.add_argument("--penalty-matrices", choices=("2d", "ndim>=2"), default="2d",
                   help="weights the penalty covers: exactly the 2-D ones (default, the "
                        "authors' rule) or every ≥2-D one (adds the patch-embedding conv)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--quick-gelu", action="store_true",
                   help="force QuickGELU (OpenAI-trained weights)")
    p.add_argument("--seed", type=int, default=0)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="override the dataset's preset epochs")
    length.add_argument("--steps", type=int, help="optimizer steps (overrides epochs)")
    p.add_argument("--batch-size", type=int,
                   help="global micro-batch (default 128; ViT-L-14: 64 with --accumulation 2)")
    p.add_argument("--accumulation", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="default 1e-5 (LoRA 1e-4)")
    p.add_argument("--weight-decay", type=float, help="default 0.1")
    p.add_argument("--warmup-steps", type=int, help="default 500")
    p.add_argument("--grad-clip", type=float, help="default 1.0; 0 disables")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--cache", metavar="DIR",
                   help="decoded images and heads (default: $ORTHOREG_CACHE/clip or "
                        "~/.cache/orthoreg/clip)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, as the authors train (default), or bf16 autocast on GPUs")
    p.add_argument("--no-amp", action="store_const", const="fp32", dest="precision",
                   help=argparse.SUPPRESS)  # the former opt-out, now the default
    p.add_argument("--augment", choices=("random-resized-crop", "none"),
                   default="random-resized-crop",
                   help="training augmentation: open_clip's RandomResizedCrop (scale 0.9–1, "
                        "bicubic; default, as the authors) or none (centre crops)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="image-decoding threads (default: ≤ 8)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--no-progress", action="store_true")


@command("finetune", "fine-tune an open_clip ViT on one image-folder task (CLIP recipe; "
         "torchrun for several GPUs)", _configure_finetune)
def finetune(args: argparse.Namespace) -> int:
    from orthoreg.clip.model import require_open_clip

    require_open_clip()
    from orthoreg.clip.run import FinetuneSpec, finetune_task, record_summary

    for name in ("batch_size", "accumulation", "steps", "lora_rank", "eval_batch_size",
                 "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if args.lam < 0:
        raise UsageError(f"--lam must be ≥ 0, got {args.lam}")
    spec = FinetuneSpec(
        model=args.model, weights=args.weights, data_root=args.data_root, task=args.task,
        out=args.out, paradigm=args.paradigm, lam=args.lam, squared=args.squared,
        quick_gelu=args.quick_gelu, seed=args.seed, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, accumulation=args.accumulation, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        cache=args.cache, device=args.device, precision=args.precision, augment=args.augment,
        penalty_matrices=args.penalty_matrices,
        eval_batch_size=args.eval_batch_size, workers=args.workers,
        progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
    )
    try:
        record = finetune_task(spec)
    except ValueError as exc:  # recipe/length problems are the user's to fix
        raise UsageError(str(exc)) from exc
    if record is not None:  # rank 0
        print(record_summary(record))
        print(f"wrote {Path(args.out) / 'run.json'}, vector.safetensors, head.safetensors")
    return 0


# ------------------------------------------------------------------------------- evaluate
def _parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("protocol", choices=sorted(PROTOCOLS), help="task addition or negation")
    p.add_argument("--run", nargs="+", required=True, metavar="DIR",
                   help="run directories written by `orthoreg finetune` (same model, paradigm)")
    p.add_argument("--data-root", metavar="DIR", help="default: the root the runs recorded")
    p.add_argument("--weights", metavar="PATH",
                   help="θ0 checkpoint if it moved (its sha256 must match the runs')")
    p.add_argument("--cache", metavar="DIR")
    p.add_argument("--device")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--alphas", type=_parse_floats,
                   help="comma-separated coefficient grid (default: the merge method's "
                        "reference grid — task_arithmetic, dare: 0, 0.05, …, 1; ties, "
                        "dare_ties, tsv, iso_c: 0.1, 0.2, …, 3.0; negation: 0, 0.05, …, 1)")
    p.add_argument("--merge", default="task_arithmetic",
                   help="addition: merge method of orthoreg.merging (default task_arithmetic)")
    p.add_argument("--control", default="ImageNet", help="negation: the control task")
    p.add_argument("--thresholds", type=_parse_floats,
                   help="negation: control retention levels (default 0.95,0.90,0.80)")
    p.add_argument("--workers", type=int)
    p.add_argument("--out", metavar="FILE", help="write the result JSON here")
    p.add_argument("--no-progress", action="store_true")


def _addition(args: argparse.Namespace, options: Any) -> dict[str, Any]:
    from orthoreg.clip.run import evaluate_addition

    result = evaluate_addition(args.run, options, alphas=args.alphas, merge=args.merge)
    print(f"task addition ({result['paradigm']}, {result['merge']}): α = {result['alpha']:g}, "
          f"test abs {result['test_abs']:.4f}, norm {result['test_norm']:.4f}")
    for task, row in result["per_task"].items():
        print(f"  {task:12s} test {row['test']:.4f}  normalized {row['test_norm']:.4f}")
    return result


def _negation(args: argparse.Namespace, options: Any) -> dict[str, Any]:
    from orthoreg.clip.run import evaluate_negation

    result = evaluate_negation(args.run, options, control=args.control, alphas=args.alphas,
                               thresholds=args.thresholds)
    for task, row in result["results"].items():
        head = row["thresholds"][0]
        print(f"  {task:12s} q={head['threshold']:g}: α = {head['alpha']:g}, target test "
              f"{head['test_target']:.4f} (pretrained {row['pretrained']['target']['test']:.4f}), "
              f"control test {head['test_control']:.4f}")
    return result


#: protocol name → evaluator (a registry, so a new protocol is one entry)
PROTOCOLS: dict[str, Callable[[argparse.Namespace, Any], dict[str, Any]]] = {
    "addition": _addition,
    "negation": _negation,
}


@command("evaluate", "task addition / negation over CLIP runs (α chosen on val splits)",
         _configure_evaluate)
def evaluate(args: argparse.Namespace) -> int:
    from orthoreg.clip.model import require_open_clip

    require_open_clip()
    from orthoreg.clip.run import EvalOptions
    from orthoreg.utils.io import atomic_write_json

    options = EvalOptions(data_root=args.data_root, weights=args.weights, cache=args.cache,
                          device=args.device, batch_size=args.batch_size,
                          workers=args.workers, progress=not args.no_progress)
    result = PROTOCOLS[args.protocol](args, options)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps({k: v for k, v in result.items() if k in ("alpha", "test_abs",
                                                                     "test_norm")}))
    return 0


# ------------------------------------------------------------------------------- clip …
def _parse_assignments(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _configure_reproduce(p: argparse.ArgumentParser) -> None:
    from orthoreg.clip.templates import CONTROL_TASK, PAPER_TASKS

    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="folder holding <Task>/{train,test}/<class>/<images> (docs/CLIP.md §3)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the one output directory (rerun the same command to resume)")
    p.add_argument("--models", type=lambda t: [v for v in t.split(",") if v],
                   default=["ViT-B-32"],
                   help="comma-separated: ViT-B-32 (default), ViT-B-16, ViT-L-14 (OpenAI "
                        "weights, QuickGELU), or paths to open_clip .json configs")
    p.add_argument("--b16", action="store_true", help="add ViT-B-16")
    p.add_argument("--l14", action="store_true", help="add ViT-L-14")
    p.add_argument("--weights-dir", default="weights", metavar="DIR",
                   help="where <model>-openai.safetensors are (default ./weights; "
                        "scripts/clip_download_weights.py writes them)")
    p.add_argument("--weights", action="append", type=_parse_assignments, default=[],
                   metavar="MODEL=PATH", help="a weights file for one model (repeatable)")
    p.add_argument("--tasks", type=lambda t: [v for v in t.split(",") if v],
                   default=list(PAPER_TASKS), help="comma-separated (default: the 8 tasks)")
    p.add_argument("--paradigms", type=lambda t: [v for v in t.split(",") if v],
                   default=list(PARADIGM_CHOICES), help="comma-separated (default: all four)")
    p.add_argument("--lam", action="append", type=_parse_assignments, default=[],
                   metavar="PARADIGM=VALUE",
                   help="OrthoReg λ for a paradigm (default: the authors' full 10, LoRA 1; "
                        "linear and partial have no published value and take 10, marked "
                        "assumed)")
    p.add_argument("--control", default=CONTROL_TASK, help="negation control (default ImageNet)")
    p.add_argument("--no-negation", action="store_true", help="addition only")
    p.add_argument("--merge", default="task_arithmetic", help="addition merge method")
    p.add_argument("--alphas", type=_parse_floats,
                   help="coefficient grid for addition and negation (default: each "
                        "protocol's and merge method's own)")
    p.add_argument("--steps", type=int, help="override the recipe's steps per task")
    p.add_argument("--epochs", type=float, help="override the recipe's epochs per task")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch")
    p.add_argument("--lr", type=float, help="override the recipe's learning rates")
    p.add_argument("--warmup-steps", type=int, help="override the recipe's 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--augment", choices=("random-resized-crop", "none"),
                   default="random-resized-crop")
    p.add_argument("--cache", metavar="DIR")
    p.add_argument("--device")
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--measure-steps", type=int, default=5,
                   help="timed steps per paradigm for the GPU-hours estimate (0: no estimate)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the estimate and what is missing, then stop")
    p.add_argument("--no-progress", action="store_true")


def _reproduce(args: argparse.Namespace) -> int:
    from orthoreg.clip.model import require_open_clip

    require_open_clip()
    from orthoreg.clip.paper import PAPER_LAMBDAS
    from orthoreg.clip.reproduce import ReproducePlan, reproduce, resolve_models

    models = list(dict.fromkeys([*args.models, *(["ViT-B-16"] if args.b16 else []),
                                 *(["ViT-L-14"] if args.l14 else [])]))
    unknown = [p for p in args.paradigms if p not in PARADIGM_CHOICES]
    if unknown:
        raise UsageError(f"--paradigms: unknown paradigm {unknown[0]!r}; choose from "
                         f"{', '.join(PARADIGM_CHOICES)}")
    lambdas = {p: v.value for p, v in PAPER_LAMBDAS.items()}
    for paradigm, value in args.lam:
        if paradigm not in lambdas:
            raise UsageError(f"--lam: unknown paradigm {paradigm!r}")
        try:
            lambdas[paradigm] = float(value)
        except ValueError:
            raise UsageError(f"--lam {paradigm}: not a number: {value!r}") from None
        if lambdas[paradigm] <= 0:
            raise UsageError(f"--lam {paradigm} must be > 0 (λ = 0 always runs as the baseline)")
    for name in ("steps", "batch_size", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    plan = ReproducePlan(
        out=args.out, data_root=args.data_root,
        models=resolve_models(models, args.weights_dir, dict(args.weights)),
        tasks=tuple(args.tasks), paradigms=tuple(args.paradigms), lambdas=lambdas,
        control=args.control, negation=not args.no_negation, merge=args.merge,
        alphas=tuple(args.alphas) if args.alphas else None, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed,
        precision=args.precision, augment=args.augment, cache=args.cache, device=args.device,
        workers=args.workers, eval_batch_size=args.eval_batch_size,
        progress=not args.no_progress)
    try:
        reproduce(plan, measure_steps=args.measure_steps, plan_only=args.plan_only)
    except ValueError as exc:  # recipe/length problems are the user's to fix
        raise UsageError(str(exc)) from exc
    return 0


def _configure_gpu_check(p: argparse.ArgumentParser) -> None:
    from orthoreg.clip.gpucheck import add_arguments

    add_arguments(p)


def _gpu_check(args: argparse.Namespace) -> int:
    from orthoreg.clip.model import require_open_clip

    require_open_clip()
    from orthoreg.clip.gpucheck import resolve_defaults, run

    return run(resolve_defaults(args))


#: `orthoreg clip ACTION` → (help, configure, run)
CLIP_ACTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                              Callable[[argparse.Namespace], int]]] = {
    "reproduce": ("the paper's CLIP table end to end in one resumable directory: fine-tune "
                  "4 paradigms × {λ = 0, the authors' λ} × 8 tasks, addition, negation, the "
                  "paper's numbers beside ours", _configure_reproduce, _reproduce),
    "gpu-check": ("scripts/gpu_check.sh: the recipe on this GPU with a random-init ViT "
                  "(no weights, no data); one JSON line", _configure_gpu_check, _gpu_check),
}


def _configure_clip(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="clip_action", metavar="ACTION")
    sub.required = True
    for name, (help_text, configure, run) in CLIP_ACTIONS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        configure(child)
        child.set_defaults(_clip_run=run)


@command("clip", "the CLIP recipe's harness: `clip reproduce` (the paper's table), "
         "`clip gpu-check`", _configure_clip)
def clip(args: argparse.Namespace) -> int:
    return int(args._clip_run(args))
