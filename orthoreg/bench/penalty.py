"""What does OrthoReg cost per training step?  ``python -m orthoreg.bench penalty``

Measured and predicted side by side, in one run, on the real training loop
(:class:`~orthoreg.training.Trainer`, one optimizer step at a time; the same model, batch
and seed with and without the penalty, variants interleaved A/B/B/A… and medians over
``--steps`` steps after ``--warmup``), on the workloads of :mod:`orthoreg.bench.workloads`:
(a) MobileNetV2, full fine-tuning; (b) a ViT-B/32-shaped transformer, full and
attention-only, exact penalty and Hutchinson's estimator; (c) LoRA on that ViT's attention,
the step with the low-rank penalty and the penalty alone in dense vs low-rank form.
With the penalty forms (variants ``exact-shape``, ``exact-growth``; ``lowrank-…`` for LoRA):
each form's penalty alone (value and gradient into ``.grad``, as a step computes it),
interleaved, against the paper form's. And on every workload: what regime tracking costs
(:meth:`~orthoreg.training.Trainer.regime`, once per logged step) as a share of a step
without penalty at the pipeline's logging interval (``--no-regime`` skips it).

Beside each measured ratio: the ratio predicted by :mod:`orthoreg.bench.costmodel` from FLOP
counts (the issue's 6·m·n·min(m, n) per matrix and what ours computes) or, for Hutchinson,
from bytes moved. Peak memory (max RSS) with and without comes from fresh subprocesses that
re-run this module (``--no-memory`` skips them). A table of predictions for the paper's
setting (ViT-B/32, 224 px, batch 128, with gradient accumulation) closes the report.

This module is the harness: timing, memory probes, the report and its goals.
A benchmark, not a test: numbers depend on the machine and its load (printed with them).
``--json PATH`` writes the figures; ``--profile`` prints a torch.profiler table of one
``vit_full`` step with the exact penalty instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from orthoreg.bench.costmodel import (
    VIT_B32,
    dense_lora_flops,
    hutchinson_bytes,
    paper_setting,
    penalty_flops,
    step_flops,
    stream_bandwidth,
)
from orthoreg.bench.workloads import FORM_VARIANTS, WORKLOADS, Workload, build_workload
from orthoreg.regularizer import OrthoReg, fused_penalty
from orthoreg.training import TrainConfig, Trainer
from orthoreg.utils.io import atomic_write_json

OVERHEAD_GOAL = 1.2  # measured penalty overhead ≤ this × the FLOP-predicted overhead
PAPER_PREDICTED_GOAL = 1.12  # issue: predicted step ratio at batch 128 (6·m·n·min FLOPs)
PAPER_OURS_GOAL = 1.06  # issue: ours at batch 128 with once-per-step penalty
HUTCHINSON_GOAL = 1.03  # step ratio at k = 8 on (b) at the CPU batch
LOWRANK_GOAL = 0.05  # low-rank penalty time ≤ this × the dense form's
SHAPE_GOAL = 1.10  # the shape form's penalty time ≤ this × the paper form's
REGIME_GOAL = 0.02  # regime tracking ≤ this share of a step at the logging interval
#: the logging interval regime tracking is charged against: the pipeline's steps // 10 for
#: the embedded config (60 steps) on the CNN, and for the CLIP recipe's 2000 steps on the ViT
REGIME_LOG_EVERY = {"cnn_full": 6, "vit_full": 200, "vit_attn": 200, "vit_lora": 200}


# ----------------------------------------------------------------------------- timing
def wanted(variant: str, args: argparse.Namespace) -> bool:
    """``--variants`` keeps the baseline and the variants named by their first word; the
    penalty forms (``exact-shape``, ``exact-growth``, …) run only when named."""
    if variant == "off":
        return True
    if args.variants is None:
        return "-" not in variant
    return variant.split()[0] in args.variants


def make_trainer(work: Workload, seed: int) -> Trainer:
    """A trainer whose :meth:`~orthoreg.training.Trainer.run` :func:`one_step` can extend.

    A warm-up that never ends keeps the learning rate a pure function of the step, so
    running the loop one step at a time changes nothing; λ only scales the gradient.
    """
    config = TrainConfig(steps=1, batch_size=work.batch, lr=1e-5, warmup_steps=10**9,
                         lam=1.0, seed=seed, progress=False, log_every=1, checkpoint_every=10**9,
                         track_regime=False)  # timed on its own (measure_regime)
    return Trainer(work.model, work.head, work.data, config)


def one_step(trainer: Trainer, device: torch.device) -> float:
    """Wall time of exactly one optimizer step of the real training loop."""
    trainer.config = dataclasses.replace(trainer.config, steps=trainer.step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def interleaved(runs: dict[str, Callable[[], float]], steps: int,
                warmup: int) -> dict[str, list[float]]:
    """Run each variant once per round, order reversed every other round; keep post-warm-up times.

    Back-to-back variants see the same state of the machine (load, clocks, caches), and the
    A/B/B/A order cancels what running first or second in a round does to a variant.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(warmup + steps):
        for name in order if round_ % 2 == 0 else order[::-1]:
            seconds = runs[name]()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


# ----------------------------------------------------------------------------- measurements
def measure_workload(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time workload ``name`` with each wanted penalty variant; one report row per variant.

    Each row carries the measured step ratio and the FLOP (and, for Hutchinson, bytes)
    prediction next to it, so that a reader sees at once whether an overhead is what the
    arithmetic implies or waste.
    """
    work = build_workload(name, args)
    work.model.to(device)
    work.head.to(device)
    trainer = make_trainer(work, args.seed)
    penalties = {variant: make() for variant, make in work.penalties.items()
                 if wanted(variant, args)}
    model_flops = step_flops(work.model, work.head, work.image) * work.batch

    def runner(variant: str) -> Callable[[], float]:
        def run() -> float:
            trainer.reg = penalties[variant]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = one_step(trainer, device)
            if device.type == "cuda":
                peaks[variant] = max(peaks.get(variant, 0), torch.cuda.max_memory_allocated(device))
            return seconds
        return run

    peaks: dict[str, int] = {}
    times = interleaved({v: runner(v) for v in penalties}, args.steps, args.warmup)
    base = statistics.median(times["off"])
    rows = []
    for variant, reg in penalties.items():
        median = statistics.median(times[variant])
        probes = args.probes if variant.startswith("hutchinson") else None
        naive = penalty_flops(reg, probes, fused=False)
        ours = penalty_flops(reg, probes, fused=True)
        measured = median / base
        # rounds run every variant back to back: the median of the per-round differences is
        # less sensitive to slow drift of the machine than the difference of the medians
        paired = 1 + statistics.median(v - o for v, o in zip(times[variant], times["off"])) / base
        row = {
            "workload": name, "label": work.label, "variant": variant,
            "batch": work.batch, "image": work.image,
            "median_s": median, "steps_s": times[variant], "ratio": measured,
            "paired_ratio": paired,
            "model_step_gflop": model_flops / 1e9,
            "penalty_gflop_issue_formula": naive / 1e9, "penalty_gflop_ours": ours / 1e9,
            "predicted_issue_formula": 1 + naive / model_flops,
            "predicted_ours": 1 + ours / model_flops,
        }
        if variant != "off" and naive / model_flops > 1e-3 and reg.form != "growth":
            # (growth has no Gram: its few m·n passes are bound by memory, not FLOPs)
            row["overhead_vs_predicted_issue"] = (measured - 1) / max(naive / model_flops, 1e-12)
            row["overhead_vs_predicted_ours"] = (measured - 1) / max(ours / model_flops, 1e-12)
        if variant != "off":
            # the same seconds of penalty against a batch-128 step scaled from this one
            row["extrapolated_batch128"] = 1 + (median - base) / (base * 128 / work.batch)
        if probes is not None and reg is not None:
            moved, bandwidth = hutchinson_bytes(reg), stream_bandwidth(reg)
            row["penalty_gb_moved"] = moved / 1e9
            row["stream_gb_s"] = bandwidth / 1e9
            row["predicted_bytes"] = 1 + moved / bandwidth / base
            row["overhead_vs_predicted_bytes"] = (measured - 1) / (moved / bandwidth / base)
        if variant in peaks:
            row["cuda_peak_mb"] = peaks[variant] / 2**20
        if name in ("vit_full", "vit_attn"):
            shape = dataclasses.replace(VIT_B32, image=work.image)
            row["analytic_model_step_gflop"] = (
                shape.step_flops(attention_only=name == "vit_attn") * work.batch / 1e9)
        rows.append(row)
    result: dict[str, Any] = {"rows": rows}
    if name == "vit_lora" and "lowrank" in penalties:
        result["lora_penalty"] = measure_lora_penalty(work, penalties["lowrank"], args, device)
    forms = {v: reg for v, reg in penalties.items() if v.split("-")[0] in ("exact", "lowrank")}
    if len(forms) > 1 and any("-" not in v for v in forms):  # the paper form and another
        result["forms"] = measure_forms(name, forms, args, device)
    if not args.no_regime:
        result["regime"] = measure_regime(name, trainer, base, args, device)
    return result


def measure_forms(name: str, forms: dict[str, OrthoReg], args: argparse.Namespace,
                  device: torch.device) -> list[dict[str, Any]]:
    """Each form's penalty alone, as a step computes it (``accumulate_grad``), interleaved.

    The difference of two step medians would bury a 10 % difference of a penalty that is a
    fraction of the step under the step's own noise; timed alone, the forms differ only in
    what they compute. Gradients are reset between calls, as ``zero_grad`` does in a step.
    """
    params = [p for reg in forms.values() for g in reg._groups for p in g.params]
    params += [p for reg in forms.values() for t in reg.lowrank for p in (t.A, t.B)]
    if any(reg.lowrank for reg in forms.values()):
        with torch.no_grad():  # B = 0 at LoRA init: every form would be trivially cheap
            for term in next(iter(forms.values())).lowrank:
                term.B.normal_(0.0, 0.02)

    def runner(reg: OrthoReg) -> Callable[[], float]:
        def run() -> float:
            for p in params:
                p.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            reg.accumulate_grad(1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started
        return run

    times = interleaved({v: runner(reg) for v, reg in forms.items()}, args.steps, args.warmup)
    for p in params:
        p.grad = None
    paper = next(v for v in forms if "-" not in v)
    base = statistics.median(times[paper])
    return [{"workload": name, "variant": v, "form": forms[v].form,
             "penalty_median_s": statistics.median(t),
             "over_paper": statistics.median(t) / base,
             "paired_over_paper": statistics.median(a / b for a, b in zip(t, times[paper])),
             "penalty_s": t} for v, t in times.items()]


def measure_regime(name: str, trainer: Trainer, step_s: float, args: argparse.Namespace,
                   device: torch.device) -> dict[str, Any]:
    """What reading ΔW's regime costs against a step without penalty (``step_s``, the median
    of the ``off`` rows just measured on the same trainer).

    The loop reads it once per logged step, so it adds ``regime / (log_every · step)`` to a
    step on average; ``log_every`` is the pipeline's for this workload (``REGIME_LOG_EVERY``,
    or ``--log-every``). Read as a baseline run reads it (λ = 0: the trainer builds its own
    reader); with a penalty it is read from the penalty object, at the same cost.
    """
    trainer.reg = None
    trainer.config = dataclasses.replace(trainer.config, track_regime=True)

    def regime() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        reading = trainer.regime()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert reading
        return time.perf_counter() - started

    matrices = len(trainer.regime() or {})
    times = interleaved({"regime": regime}, args.steps, args.warmup)["regime"]
    trainer.config = dataclasses.replace(trainer.config, track_regime=False)
    log_every = args.log_every or REGIME_LOG_EVERY[name]
    regime_s = statistics.median(times)
    return {"workload": name, "matrices": matrices, "step_median_s": step_s,
            "regime_median_s": regime_s, "log_every": log_every,
            "overhead": regime_s / (log_every * step_s), "regime_s": times}


def measure_lora_penalty(work: Workload, lowrank: OrthoReg, args: argparse.Namespace,
                         device: torch.device) -> dict[str, Any]:
    """Penalty alone (forward + backward): R of the merged s·B·A vs the low-rank form."""
    terms = lowrank.lowrank
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, term in enumerate(terms):
        shape = (term.B.shape[0], term.A.reshape(term.A.shape[0], -1).shape[1])
        by_shape.setdefault(shape, []).append(index)
    factors = [p for term in terms for p in (term.A, term.B)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def dense() -> float:
        sync()
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for members in by_shape.values():
            merged = [terms[i].scale * (terms[i].B.reshape(terms[i].B.shape[0], -1)
                                        @ terms[i].A.reshape(terms[i].A.shape[0], -1))
                      for i in members]
            total = total + fused_penalty(merged, squared=False).sum()
        total.backward()
        sync()
        return time.perf_counter() - started

    def low() -> float:
        sync()
        started = time.perf_counter()
        lowrank().backward()
        sync()
        return time.perf_counter() - started

    with torch.no_grad():  # B = 0 at LoRA init would make the dense Gram trivially cheap
        for term in terms:
            term.B.normal_(0.0, 0.02)
    dense_value = sum(float(fused_penalty([t.scale * (t.B @ t.A)]).detach()) for t in terms)
    low_value = float(lowrank().detach())
    times = interleaved({"dense": dense, "lowrank": low}, args.steps, args.warmup)
    for p in factors:
        p.grad = None
    naive, fused = dense_lora_flops(work.model)
    dense_median = statistics.median(times["dense"])
    low_median = statistics.median(times["lowrank"])
    return {
        "adapters": len(terms), "dense_median_s": dense_median, "lowrank_median_s": low_median,
        "lowrank_over_dense": low_median / dense_median,
        "dense_gflop_issue_formula": naive / 1e9, "dense_gflop_ours": fused / 1e9,
        "lowrank_gflop": penalty_flops(lowrank, None, True) / 1e9,
        "values_agree": abs(dense_value - low_value) <= 1e-3 * max(1.0, abs(dense_value)),
        "dense_value": dense_value, "lowrank_value": low_value,
    }


# ----------------------------------------------------------------------------- memory
def memory_probe(name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: build, run two steps with ``variant``, report peak RSS."""
    work = build_workload(name, args)
    trainer = make_trainer(work, args.seed)
    trainer.reg = work.penalties[variant]()
    built = _rss_mb()
    for _ in range(2):  # the second step runs with the optimizer state allocated
        one_step(trainer, torch.device("cpu"))
    return {"workload": name, "variant": variant, "rss_after_build_mb": built,
            "peak_rss_mb": _peak_rss_mb()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's high-water RSS. Not ``ru_maxrss``: a child inherits the parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(names: Sequence[str], args: argparse.Namespace,
                   argv: Sequence[str]) -> list[dict[str, Any]]:
    """Peak RSS of each workload and variant, each from a fresh ``--_probe`` subprocess.

    A process's high-water mark never goes down, so only a process that ran one variant
    alone can say what that variant needs; ``argv`` passes the sizes on.
    """
    jobs = []
    for name in names:
        variants = ["off", "lowrank" if name == "vit_lora" else "exact"]
        if name == "vit_full":
            variants.append(f"hutchinson k={args.probes}")
        jobs += [(name, v) for v in variants if wanted(v, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results, running = [], []
    for name, variant in jobs:  # two at a time: RSS is per process, so they do not mix
        command = [sys.executable, "-m", "orthoreg.bench.penalty", *argv,
                   "--_probe", name, variant]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env))
        if len(running) == 2:
            results += [_collect(p) for p in running]
            running = []
    results += [_collect(p) for p in running]
    return results


def _collect(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"memory probe failed ({process.args})")
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def report(figures: dict[str, Any]) -> str:
    """The figures as the text table printed at the end of a run."""
    lines = [f"machine: {figures['machine']}"]
    header = (f"{'workload':<9} {'variant':<15} {'batch':>5} {'step s':>7} {'ratio':>6} "
              f"{'paired':>6} "
              f"{'pred6':>6} {'predO':>6} {'ovh/p6':>6} {'ovh/pO':>6} {'@128':>6}")
    lines += ["", header, "-" * len(header)]
    for row in figures["rows"]:
        extra = [f"{row[k]:6.2f}" if k in row else f"{'':6}" for k in
                 ("overhead_vs_predicted_issue", "overhead_vs_predicted_ours",
                  "extrapolated_batch128")]
        lines.append(
            f"{row['workload']:<9} {row['variant']:<15} {row['batch']:>5} {row['median_s']:7.3f} "
            f"{row['ratio']:6.3f} {row['paired_ratio']:6.3f} {row['predicted_issue_formula']:6.3f} "
            f"{row['predicted_ours']:6.3f} " + " ".join(extra))
    lines.append("ratio: median step / median step without OrthoReg; paired: 1 + median of the "
                 "per-round differences / median step without; pred6/predO: 1 + penalty/"
                 "model FLOPs with 6·m·n·min(m,n) per matrix (the issue's formula) or ours "
                 "(3.25·m·n·min for 768-wide Grams; Hutchinson 10·m·n·k); ovh/pX: measured "
                 "overhead over predicted; @128: the same penalty seconds against a step scaled "
                 "to batch 128")
    for row in figures["rows"]:
        if "predicted_bytes" in row:
            lines.append(f"memory-bound, {row['workload']} {row['variant']}: moves "
                         f"{row['penalty_gb_moved']:.2f} GB per step; at the streaming rate of "
                         f"W − θ0 on its weights ({row['stream_gb_s']:.1f} GB/s) that "
                         f"predicts {row['predicted_bytes']:.3f}; measured overhead / predicted "
                         f"{row['overhead_vs_predicted_bytes']:.2f}")
    checks = {r["workload"]: r for r in figures["rows"] if "analytic_model_step_gflop" in r}
    for name, row in checks.items():
        lines.append(f"FLOP count check, {name}: layer hooks {row['model_step_gflop']:.1f} GFLOP, "
                     f"analytic {row['analytic_model_step_gflop']:.1f} GFLOP per step")
    labels = dict.fromkeys(row["label"] for row in figures["rows"])
    lines += [f"  {row_label}" for row_label in labels]
    lora = figures.get("lora_penalty")
    if lora:
        lines += ["", f"(c) LoRA penalty alone, {lora['adapters']} adapters, forward+backward: "
                  f"dense form {lora['dense_median_s'] * 1e3:.1f} ms "
                  f"({lora['dense_gflop_ours']:.1f} GFLOP), low-rank {lora['lowrank_median_s'] * 1e3:.2f} ms "
                  f"({lora['lowrank_gflop'] * 1e3:.1f} MFLOP): ratio "
                  f"{lora['lowrank_over_dense']:.4f} (goal ≤ {LOWRANK_GOAL}); values agree: "
                  f"{lora['values_agree']}"]
    if figures.get("forms"):
        lines += ["", "penalty forms, penalty alone (value + gradient into .grad), medians:"]
        for row in figures["forms"]:
            lines.append(f"  {row['workload']:<9} {row['variant']:<15} "
                         f"{row['penalty_median_s'] * 1e3:9.1f} ms  ×{row['over_paper']:.3f} "
                         f"the paper form's (paired ×{row['paired_over_paper']:.3f})")
    if figures.get("regime"):
        lines += ["", "regime tracking (σ_max, median σ, R/√n, ‖ΔW‖_F of every covered matrix), "
                  "once per logged step:"]
        for row in figures["regime"]:
            lines.append(f"  {row['workload']:<9} {row['regime_median_s'] * 1e3:9.1f} ms per "
                         f"reading, step {row['step_median_s'] * 1e3:.0f} ms: "
                         f"{100 * row['overhead']:.2f} % of a step at log_every = "
                         f"{row['log_every']}")
    if figures.get("memory"):
        lines += ["", "peak RSS (fresh process, 2 steps):"]
        base = {m["workload"]: m["peak_rss_mb"] for m in figures["memory"] if m["variant"] == "off"}
        for m in figures["memory"]:
            delta = m["peak_rss_mb"] - base.get(m["workload"], m["peak_rss_mb"])
            lines.append(f"  {m['workload']:<9} {m['variant']:<15} {m['peak_rss_mb']:8.0f} MB"
                         f"  (+{delta:.0f} MB vs off; "
                         f"{m['rss_after_build_mb']:.0f} MB after build)")
    lines += ["", "predicted for the paper's setting (224 px, batch 128 = K micro-batches; 6: "
              "6·m·n·min(m,n) per matrix, O: ours; per-micro: penalty every micro-batch, as the "
              "authors' code; once: once per optimizer step, as ours):",
              f"  {'model':<8} {'K':>2} {'micro':>5} {'per-micro 6':>11} {'once 6':>7} "
              f"{'once O':>7} {'hutch':>7} {'attn 6':>7} {'attn O':>7}"]
    for p in figures["paper_setting"]:
        lines.append(
            f"  {p['model']:<8} {p['accumulation']:>2} {p['micro_batch']:>5} "
            f"{p['per_micro_batch_issue_formula']:11.4f} "
            f"{p['once_per_step_issue_formula']:7.4f} {p['once_per_step_ours']:7.4f} "
            f"{p['once_per_step_hutchinson']:7.4f} {p['attention_only_issue_formula']:7.4f} "
            f"{p['attention_only_ours']:7.4f}")
    lines += ["", "goals:"] + [f"  {goal}: {verdict}" for goal, verdict in figures["goals"].items()]
    return "\n".join(lines)


def goals(figures: dict[str, Any], probes: int) -> dict[str, str]:
    """A verdict per goal: the figure and ``met`` or ``MISSED``, for the report and the JSON."""
    verdicts: dict[str, str] = {}
    exact_rows = [r for r in figures["rows"] if r["variant"] in ("exact",)]
    for row in exact_rows:
        verdicts[f"{row['workload']} overhead ≤ {OVERHEAD_GOAL}× predicted (6 / ours)"] = (
            f"{row['overhead_vs_predicted_issue']:.2f} / {row['overhead_vs_predicted_ours']:.2f}")
    settings = {p["model"]: p for p in figures["paper_setting"] if p["accumulation"] == 1}
    for model, paper in settings.items():
        predicted, ours = paper["once_per_step_issue_formula"], paper["once_per_step_ours"]
        hutch = paper["once_per_step_hutchinson"]
        verdicts[f"{model}, batch 128: predicted (6·mn·min) ≤ {PAPER_PREDICTED_GOAL}"] = (
            f"{predicted:.4f} ({'met' if predicted <= PAPER_PREDICTED_GOAL else 'MISSED'})")
        verdicts[f"{model}, batch 128: ours (exact, once per step) ≤ {PAPER_OURS_GOAL}"] = (
            f"{ours:.4f} predicted ({'met' if ours <= PAPER_OURS_GOAL else 'MISSED'}); "
            f"Hutchinson k={probes} {hutch:.4f} "
            f"({'met' if hutch <= PAPER_OURS_GOAL else 'MISSED'})")
    for row in figures["rows"]:
        if "overhead_vs_predicted_bytes" in row:
            verdicts[f"{row['workload']} {row['variant']} overhead ≤ {OVERHEAD_GOAL}× predicted "
                     f"from bytes moved"] = (
                f"{row['overhead_vs_predicted_bytes']:.2f} "
                f"({'met' if row['overhead_vs_predicted_bytes'] <= OVERHEAD_GOAL else 'MISSED'})")
    for row in figures["rows"]:
        if row["variant"] == f"hutchinson k={probes}" and row["workload"] == "vit_full":
            met = max(row["ratio"], row["paired_ratio"]) <= HUTCHINSON_GOAL
            verdicts[f"Hutchinson k={probes} step ratio ≤ {HUTCHINSON_GOAL} on vit_full"] = (
                f"{row['ratio']:.3f} (paired {row['paired_ratio']:.3f}) at batch {row['batch']} "
                f"({'met' if met else 'MISSED'}); "
                f"~{row['extrapolated_batch128']:.3f} at batch 128")
    for row in figures.get("forms", []):
        if row["form"] == "shape":
            ratio = max(row["over_paper"], row["paired_over_paper"])
            verdicts[f"{row['workload']}: shape form's penalty ≤ {SHAPE_GOAL}× the paper's"] = (
                f"{row['over_paper']:.3f} (paired {row['paired_over_paper']:.3f}) "
                f"({'met' if ratio <= SHAPE_GOAL else 'MISSED'})")
    for row in figures.get("regime", []):
        verdicts[f"{row['workload']}: regime tracking ≤ {100 * REGIME_GOAL:g} % of a step at "
                 f"log_every = {row['log_every']}"] = (
            f"{100 * row['overhead']:.2f} % ({'met' if row['overhead'] <= REGIME_GOAL else 'MISSED'})")
    lora = figures.get("lora_penalty")
    if lora:
        verdicts[f"LoRA low-rank ≤ {LOWRANK_GOAL} × dense"] = (
            f"{lora['lowrank_over_dense']:.4f} "
            f"({'met' if lora['lowrank_over_dense'] <= LOWRANK_GOAL else 'MISSED'})")
    return verdicts


def profile_step(args: argparse.Namespace, device: torch.device) -> str:
    """torch.profiler's table of one ``vit_full`` step with the exact penalty, after warm-up.

    Where the ratios say a step is slow, this says which operators it spends its time in.
    """
    from torch.profiler import ProfilerActivity, profile

    work = build_workload("vit_full", args)
    trainer = make_trainer(work, args.seed)
    trainer.reg = work.penalties["exact"]()
    for _ in range(max(1, args.warmup)):
        one_step(trainer, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step(trainer, device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="python -m orthoreg.bench penalty",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 steps after 1 warm-up")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--vit-batch", type=int, default=4)
    parser.add_argument("--vit-image", type=int, default=224)
    parser.add_argument("--cnn-batch", type=int, default=32)
    parser.add_argument("--cnn-image", type=int, default=64)
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes k")
    forms = [f"{kind}-{form}" for kind in ("exact", "lowrank") for form in FORM_VARIANTS]
    parser.add_argument("--variants", nargs="+",
                        choices=("exact", "hutchinson", "lowrank", *forms),
                        default=None, help="only these beside the baseline (default: all "
                        "but the penalty forms exact-shape, exact-growth, lowrank-…)")
    parser.add_argument("--no-regime", action="store_true",
                        help="skip timing regime tracking")
    parser.add_argument("--log-every", type=int, default=None,
                        help="charge regime tracking against this logging interval "
                             "(default: the pipeline's, per workload)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--profile", action="store_true",
                        help="print a profiler table of one vit_full step with OrthoReg")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--_probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        print(json.dumps(memory_probe(*args._probe, args)))
        return 0
    device = torch.device(args.device)
    if args.profile:
        print(profile_step(args, device))
        return 0
    started, load = time.perf_counter(), os.getloadavg()[0]
    figures: dict[str, Any] = {"rows": [], "steps": args.steps, "warmup": args.warmup,
                               "threads": torch.get_num_threads(), "device": str(device)}
    for name in args.only:
        result = measure_workload(name, args, device)
        figures["rows"] += result["rows"]
        if "lora_penalty" in result:
            figures["lora_penalty"] = result["lora_penalty"]
        figures.setdefault("forms", []).extend(result.get("forms", []))
        if "regime" in result:
            figures.setdefault("regime", []).append(result["regime"])
    if not args.no_memory and device.type == "cpu":
        sizes = ["--seed", args.seed, "--vit-batch", args.vit_batch,
                 "--vit-image", args.vit_image, "--cnn-batch", args.cnn_batch,
                 "--cnn-image", args.cnn_image, "--probes", args.probes,
                 *(["--variants", *args.variants] if args.variants else [])]
        figures["memory"] = measure_memory(args.only, args, [str(a) for a in sizes])
    figures["paper_setting"] = paper_setting(args.probes)
    figures["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads, "
        f"device {device}, load avg {load:.1f} → {os.getloadavg()[0]:.1f}, "
        f"{args.steps} steps after {args.warmup} warm-up, {time.perf_counter() - started:.0f} s")
    figures["goals"] = goals(figures, args.probes)
    print(report(figures))
    if args.json is not None:
        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":  # the memory probes re-run this module in a subprocess
    from orthoreg.utils.allocator import tune_allocator

    tune_allocator()
    raise SystemExit(main(sys.argv[1:]))
