"""``scripts/gpu_check.sh``: does the CLIP recipe run on this GPU, and at what cost?

Needs no weights and no data (:mod:`orthoreg.clip.probe`): a randomly initialised open_clip
ViT-B/32, synthetic images, zero-shot heads from its random text tower. It runs, on CUDA:

- ``--steps`` (20) optimizer steps of each paradigm with OrthoReg (λ of
  :data:`orthoreg.clip.paper.PAPER_LAMBDAS`) in fp32 and in bf16, and the same without
  OrthoReg (λ = 0): every loss finite, the median step time, peak memory;
- the penalty's step-time ratio t(λ > 0) / t(λ = 0) per paradigm and precision;
- fp32 evaluation throughput (images/s);
- a one-GPU ``torchrun`` whose worker joins an NCCL process group, all-reduces, and trains
  a few steps inside it;

and prints one JSON line of figures (exit 0 when every check passed, 1 otherwise). It takes
about two minutes on one modern GPU; ``--dry-run`` does the same on the CPU with a tiny ViT,
2 steps and gloo, which the CLIP test suite runs.

    bash scripts/gpu_check.sh                 # on a GPU machine, in .venv-clip
    bash scripts/gpu_check.sh --dry-run       # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from orthoreg.clip.paper import PAPER_LAMBDAS
from orthoreg.clip.recipe import PARADIGM_RECIPES, PRECISIONS
from orthoreg.utils.io import atomic_write_text

#: a 2-layer ViT small enough for a CPU dry run (the CLIP tests' tiny model)
DRY_RUN_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
DRY_RUN_NAME = "orthoreg-gpucheck-tiny"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The check's options (also `orthoreg clip gpu-check`'s)."""
    p.add_argument("--device", help="cuda (default) or cpu")
    p.add_argument("--model", default="ViT-B-32", help="open_clip config (default ViT-B-32)")
    p.add_argument("--steps", type=int, help="optimizer steps per configuration (default 20)")
    p.add_argument("--batch-size", type=int, help="default 128 (the recipe's)")
    p.add_argument("--paradigms", default=",".join(PARADIGM_RECIPES),
                   help="comma-separated (default: all four)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny ViT, 2 steps, batch 4, gloo: checks the script, not a GPU")
    p.add_argument("--no-torchrun", action="store_true", help="skip the torchrun check")
    p.add_argument("--out", metavar="FILE", help="also write the JSON line here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # torchrun child


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the options left open: the dry run's CPU-sized values, else the GPU's."""
    if args.dry_run:
        args.device = args.device or "cpu"
        args.steps = args.steps or 2
        args.batch_size = args.batch_size or 4
    args.device = args.device or "cuda"
    args.steps = args.steps or 20
    args.batch_size = args.batch_size or 128
    return args


def _model_name(args: argparse.Namespace, folder: Path) -> str:
    """The dry run's tiny config is written to a file, which open_clip registers by path."""
    if not args.dry_run:
        return args.model
    path = folder / f"{DRY_RUN_NAME}.json"
    atomic_write_text(path, json.dumps(DRY_RUN_CONFIG))
    return str(path)


def _environment(device: torch.device) -> dict[str, Any]:
    import open_clip

    env: dict[str, Any] = {"torch": torch.__version__, "open_clip": open_clip.__version__,
                           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "cuda": torch.version.cuda})
    return env


def training_checks(model: str, device: torch.device, paradigms: Sequence[str], steps: int,
                    batch_size: int) -> dict[str, Any]:
    """Every paradigm × precision × {OrthoReg, baseline}: times, memory, finiteness."""
    from orthoreg.clip.probe import (
        eval_images_per_second,
        random_parts,
        synthetic_eval_set,
        synthetic_train_set,
        time_training,
    )

    backbone, head = random_parts(model, classes=10, device=device)
    size = backbone.image_size
    data = synthetic_train_set(max(batch_size * 4, 16), size, 10, device=device)
    runs = []
    for paradigm in paradigms:
        for precision in PRECISIONS:
            for lam in (PAPER_LAMBDAS[paradigm].value, 0.0):
                timing = time_training(backbone, head, data, paradigm, lam, precision, steps,
                                       batch_size, device, model=model)
                runs.append(timing.to_dict())
    ratios = {}
    for paradigm in paradigms:
        for precision in PRECISIONS:
            with_reg, without = (next(r for r in runs if r["paradigm"] == paradigm
                                      and r["precision"] == precision and (r["lam"] > 0) == on)
                                 for on in (True, False))
            ratios[f"{paradigm}/{precision}"] = round(
                with_reg["seconds_per_step"] / without["seconds_per_step"], 4)
    throughput = eval_images_per_second(backbone, head, synthetic_eval_set(
        max(batch_size * 2, 16), size, 10), device, batch_size=max(batch_size, 16))
    return {"runs": runs, "penalty_step_time_ratio": ratios,
            "eval_images_per_second": round(throughput, 1)}


def torchrun_check(model: str, device: torch.device, steps: int, batch_size: int,
                   timeout: float = 240.0) -> dict[str, Any]:
    """Launch a one-process ``torchrun`` job of :func:`worker` and read its JSON line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "1", "-m", "orthoreg.clip.gpucheck", "--worker",
               "--device", device.type, "--model", model, "--steps", str(steps),
               "--batch-size", str(batch_size)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"torchrun did not finish in {timeout:.0f} s"}
    seconds = round(time.perf_counter() - started, 2)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"ok": False, "returncode": done.returncode, "seconds": seconds, "error": tail}
    return {**json.loads(lines[-1]), "seconds": seconds}


def worker(args: argparse.Namespace) -> int:
    """The torchrun child: NCCL (gloo on CPU) group, an all-reduce, training steps inside it."""
    import datetime

    from orthoreg.clip.probe import random_parts, synthetic_train_set, time_training
    from orthoreg.clip.run import distributed

    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=3),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        with distributed(args.device) as job:
            value = torch.ones(4, device=job.device) * (job.rank + 1)
            dist.all_reduce(value)
            expected = job.world * (job.world + 1) / 2
            job.barrier()
            backbone, head = random_parts(args.model, classes=10, device=job.device)
            data = synthetic_train_set(max(args.batch_size * 2, 16), backbone.image_size, 10,
                                       device=job.device)
            timing = time_training(backbone, head, data, "full", PAPER_LAMBDAS["full"].value,
                                   "fp32", args.steps, args.batch_size, job.device,
                                   model=args.model)
            result = {"ok": bool(torch.allclose(value.cpu(), torch.full((4,), expected))
                                 and timing.finite),
                      "backend": dist.get_backend(), "world_size": job.world,
                      "all_reduce": float(value[0]),
                      "seconds_per_step": round(timing.seconds_per_step, 5)}
    finally:
        dist.destroy_process_group()
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return resolve_defaults(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Every check; one JSON line on stdout; 0 when all passed (module doc)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orthoreg-gpucheck-") as folder:
        model = _model_name(args, Path(folder))
        args.model = model
        if args.worker:
            return worker(args)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(json.dumps({"ok": False, "error": "CUDA is not available (use --dry-run "
                              "to check the script on a CPU)"}))
            return 1
        paradigms = [p for p in args.paradigms.split(",") if p]
        unknown = [p for p in paradigms if p not in PARADIGM_RECIPES]
        if unknown:
            print(json.dumps({"ok": False, "error": f"unknown paradigm {unknown[0]!r}"}))
            return 1
        report: dict[str, Any] = {"check": "orthoreg.clip.gpucheck", "dry_run": args.dry_run,
                                  "model": args.model if not args.dry_run else DRY_RUN_NAME,
                                  "steps": args.steps, "batch_size": args.batch_size,
                                  **_environment(device)}
        report.update(training_checks(model, device, paradigms, args.steps, args.batch_size))
        if device.type == "cuda":
            peaks = [r["peak_memory_bytes"] for r in report["runs"]]
            report["peak_memory_gib"] = round(max(peaks) / 2**30, 3)
        if not args.no_torchrun:
            report["torchrun"] = torchrun_check(model, device, args.steps, args.batch_size)
        report["ok"] = (all(run["finite"] for run in report["runs"])
                        and report.get("torchrun", {"ok": True})["ok"])
        report["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        from orthoreg.utils.io import atomic_write_text

        atomic_write_text(args.out, line + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
