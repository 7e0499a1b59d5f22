"""``orthoreg bench load``: how much one competing CPU-bound process slows training, per
thread setting, measured quiet and loaded in one run.

Why: on a 2-core machine one other busy process made ``orthoreg demo --quick`` 14× slower
(48 → 668 s). Two things can do that: more runnable threads than cores (torch's intra-op
pool has one thread per core, and the competitor takes one), and OpenMP threads that
*spin* at every barrier waiting for a sibling that the scheduler has descheduled (libgomp,
which torch's CPU wheels use, spins ≈ 300 000 iterations before sleeping unless
``OMP_WAIT_POLICY=PASSIVE``). Which one matters is measured here, not assumed.

The workload is the quick demo's: the zoo's MobileNetV2, ``full`` paradigm with OrthoReg
(λ = 1), 32 px, batch 16, optimizer steps of the real :class:`Trainer` on a fresh copy (as
every fine-tune stage starts; its first step is counted), then forward passes of batches of
64 images (as the coefficient searches do). Inputs are random: the timing does not depend
on the pixels, and the bench needs no dataset. Each measurement has a time budget
(``--seconds``: two thirds training, one third evaluation) and reports *rates*, steps/s
and images/s, so a pathological setting costs the run its budget, not minutes per step.

One worker process per setting (the wait policy is read once, when the OpenMP runtime
starts, so each setting needs its own process), all started up front and idle between
measurements. The competitor is one pure-Python busy loop, started once and switched on
("loaded") and off ("quiet") with SIGCONT/SIGSTOP; "quiet" means without *our* competitor
— whatever else the machine runs stays, and the report prints the machine's run queue
beside every measurement. Rounds interleave settings and conditions (quiet, loaded, then
loaded, quiet in the next round), so drift in the background load falls on all of them
alike; the report gives medians with their range and the per-round paired slowdown.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: environment variables a setting controls; removed from the workers' environment unless
#: the setting names them, so the parent's own environment cannot leak in
CONTROLLED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Setting:
    """One way to run the workload: an intra-op thread count and OpenMP environment."""

    name: str
    threads: str  # "all" (available cores), "auto" (free cores, re-read per measurement), or N
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("all", "all", {}, "one thread per available core, libgomp's default spinning"),
    Setting("all-passive", "all", {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread per core, threads sleep at barriers at once"),
    Setting("all-spin0", "all", {"GOMP_SPINCOUNT": "0"}, "as passive, libgomp's own knob"),
    Setting("all-spin10k", "all", {"GOMP_SPINCOUNT": "10000"},
            "one thread per core, spinning 10^4 rounds (a few µs) before sleeping"),
    Setting("all-spin100k", "all", {"GOMP_SPINCOUNT": "100000"},
            "one thread per core, spinning 10^5 rounds before sleeping"),
    Setting("one", "1", {}, "a single intra-op thread"),
    Setting("auto", "auto", {"OMP_WAIT_POLICY": "PASSIVE"},
            "available cores minus other runnable tasks, read before each measurement"),
)}
DEFAULT_SETTINGS = ("all", "all-passive", "one", "auto")

BUSY_LOOP = "while True:\n    pass\n"
EVAL_BATCH = 64


# ---------------------------------------------------------------------------- the worker
class _Enough(Exception):
    """Raised from the trainer's per-step callback once the time budget is spent."""


def _worker(setting: Setting, seconds: float) -> None:
    """Build the workload once, then measure it each time the parent writes ``run``."""
    import copy

    import torch
    from torch.utils.data import TensorDataset

    from orthoreg.evaluation import accuracy
    from orthoreg.paradigms import get_paradigm
    from orthoreg.training import TrainConfig, finetune
    from orthoreg.utils.allocator import tune_allocator
    from orthoreg.utils.threads import available_cores, free_cores
    from orthoreg.zoo.registry import family_of

    tune_allocator()  # as the entry points do

    def set_threads() -> int:
        if setting.threads == "all":
            torch.set_num_threads(available_cores())
        elif setting.threads == "auto":
            torch.set_num_threads(free_cores())
        else:
            torch.set_num_threads(int(setting.threads))
        return torch.get_num_threads()

    backbone = family_of("mobilenet_v2").get_model("mobilenet_v2").eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(128, 3, 32, 32, generator=generator),
                          torch.randint(0, 10, (128,), generator=generator))
    evaluation = (torch.randn(EVAL_BATCH, 3, 32, 32, generator=generator),
                  torch.randint(0, 10, (EVAL_BATCH,), generator=generator))
    head = torch.nn.Linear(backbone.feature_dim, 10)
    config = TrainConfig(steps=10**6, batch_size=16, lr=1e-4, warmup_steps=1, lam=1.0,
                         log_every=1, checkpoint_every=10**6, progress=False)
    paradigm = get_paradigm("full")

    def train_rate(budget: float) -> tuple[float, int]:
        """Optimizer steps per second of a fresh fine-tune (its first step included, as in
        the demo's short stages), stopped after the first step that ends past ``budget``."""
        model = paradigm.prepare(copy.deepcopy(backbone))
        stamps: list[float] = []

        def on_step(_: dict[str, float]) -> None:
            stamps.append(time.perf_counter())
            if stamps[-1] - started >= budget:
                raise _Enough

        started = time.perf_counter()
        try:
            finetune(model, head, train, config, on_log=on_step)
        except _Enough:
            pass
        return len(stamps) / (stamps[-1] - started), len(stamps)

    def eval_rate(budget: float) -> tuple[float, int]:
        """Images per second through forward passes of one batch of 64 (the searches' unit),
        stopped after the first batch that ends past ``budget``."""
        started, batches = time.perf_counter(), 0
        while batches == 0 or time.perf_counter() - started < budget:
            accuracy(backbone, head, evaluation, batch_size=EVAL_BATCH)
            batches += 1
        return batches * EVAL_BATCH / (time.perf_counter() - started), batches

    def measure() -> dict[str, Any]:
        threads = set_threads()
        cpu_started = time.process_time()
        wall_started = time.perf_counter()
        steps_per_s, steps = train_rate(seconds * 2 / 3)
        images_per_s, batches = eval_rate(seconds / 3)
        return {"threads": threads, "steps_per_s": steps_per_s, "steps": steps,
                "images_per_s": images_per_s, "batches": batches,
                "cpu_per_wall": (time.process_time() - cpu_started)
                / (time.perf_counter() - wall_started)}

    set_threads()
    train_rate(0.0)  # warm-up: first-touch allocations, oneDNN primitive caches
    eval_rate(0.0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(measure()), flush=True)


# ---------------------------------------------------------------------------- the parent
class Worker:
    """A worker process for one setting, idle (blocked on stdin) between measurements."""

    def __init__(self, setting: Setting, seconds: float) -> None:
        env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
        env.update(setting.env)
        self.setting = setting
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orthoreg.bench.load", "--worker", setting.name,
             "--seconds", str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.setting.name!r} exited ({self.proc.wait()})")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._read()

    def run(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Competitor:
    """One CPU-bound pure-Python process, switched on and off with SIGCONT/SIGSTOP."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        self.stop()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def start(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def machine_load() -> dict[str, float | None]:
    from orthoreg.utils.threads import other_runnable

    return {"loadavg_1min": float(Path("/proc/loadavg").read_text().split()[0])
            if Path("/proc/loadavg").is_file() else None,
            "other_runnable": other_runnable()}


def measure(settings: Sequence[Setting], rounds: int, seconds: float, settle: float = 0.5,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Interleaved rounds; one record per (round, setting, condition)."""
    records: list[dict[str, Any]] = []
    workers = [Worker(s, seconds) for s in settings]
    competitor = Competitor()
    try:
        for worker in workers:
            worker.wait_ready()
        for round_index in range(rounds):
            shift = round_index % len(workers)
            conditions = ("quiet", "loaded") if round_index % 2 == 0 else ("loaded", "quiet")
            for worker in workers[shift:] + workers[:shift]:
                for condition in conditions:
                    if condition == "loaded":
                        competitor.start()
                    time.sleep(settle)  # let the scheduler (and `auto`'s sampling) see it
                    load = machine_load()
                    result = worker.run()
                    competitor.stop()
                    record = {"round": round_index, "setting": worker.setting.name,
                              "condition": condition, **result, **load}
                    records.append(record)
                    log(f"  round {round_index} {worker.setting.name:12s} {condition:6s} "
                        f"threads={result['threads']} {result['steps_per_s']:5.2f} steps/s "
                        f"({result['steps']}) {result['images_per_s']:6.0f} images/s "
                        f"cpu/wall {result['cpu_per_wall']:4.2f}  others runnable "
                        f"{load['other_runnable']}, load {load['loadavg_1min']}")
    finally:
        competitor.close()
        for worker in workers:
            worker.close()
    return records


RATES = {"train": "steps_per_s", "eval": "images_per_s"}


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: median rates (with range) quiet and loaded, the slowdown quiet/loaded as
    a ratio of medians and as the median of per-round pairs, and the loaded rate against the
    best quiet rate of any setting (what the user sees, whatever setting they would pick)."""
    rows = []
    for name in dict.fromkeys(r["setting"] for r in records):
        mine = [r for r in records if r["setting"] == name]
        row: dict[str, Any] = {"setting": name, "note": SETTINGS[name].note}
        for condition in ("quiet", "loaded"):
            here = [r for r in mine if r["condition"] == condition]
            row[f"{condition}_threads"] = sorted({r["threads"] for r in here})
            for part, key in RATES.items():
                values = [r[key] for r in here]
                row[f"{condition}_{part}"] = statistics.median(values)
                row[f"{condition}_{part}_range"] = [min(values), max(values)]
        for part, key in RATES.items():
            row[f"slowdown_{part}"] = row[f"quiet_{part}"] / row[f"loaded_{part}"]
            paired = []
            for round_index in sorted({r["round"] for r in mine}):
                pair = {r["condition"]: r[key] for r in mine if r["round"] == round_index}
                if len(pair) == 2:
                    paired.append(pair["quiet"] / pair["loaded"])
            row[f"paired_{part}"] = statistics.median(paired)
            row[f"paired_{part}_range"] = [min(paired), max(paired)]
        rows.append(row)
    for part in RATES:
        best = max(row[f"quiet_{part}"] for row in rows)
        for row in rows:
            row[f"vs_best_quiet_{part}"] = best / row[f"loaded_{part}"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def span(values: list[float], digits: int) -> str:
        return f"[{values[0]:.{digits}f}-{values[1]:.{digits}f}]"

    head = (f"{'setting':12s} {'thr q/l':>7s} {'steps/s quiet':>18s} {'steps/s loaded':>18s} "
            f"{'slowdown':>8s} {'paired':>16s} {'vs best':>7s} {'img/s quiet':>11s} "
            f"{'img/s loaded':>12s} {'slowdown':>8s} {'vs best':>7s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        threads = (f"{','.join(map(str, row['quiet_threads']))}/"
                   f"{','.join(map(str, row['loaded_threads']))}")
        lines.append(
            f"{row['setting']:12s} {threads:>7s} "
            f"{row['quiet_train']:5.2f} {span(row['quiet_train_range'], 2):>12s} "
            f"{row['loaded_train']:5.2f} {span(row['loaded_train_range'], 2):>12s} "
            f"{row['slowdown_train']:8.2f} {row['paired_train']:5.2f} "
            f"{span(row['paired_train_range'], 2):>10s} {row['vs_best_quiet_train']:7.2f} "
            f"{row['quiet_eval']:11.0f} {row['loaded_eval']:12.0f} "
            f"{row['slowdown_eval']:8.2f} {row['vs_best_quiet_eval']:7.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orthoreg bench load",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, from {', '.join(SETTINGS)} "
                             f"(default {','.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time budget per measurement: 2/3 training, 1/3 evaluation; a "
                             "step or batch that has begun is finished (default 4)")
    parser.add_argument("--json", type=Path, help="write the records and the summary here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.worker:
        _worker(SETTINGS[args.worker], args.seconds)
        return 0
    unknown = [name for name in args.settings.split(",") if name not in SETTINGS]
    if unknown or args.rounds < 1 or args.seconds <= 0:
        parser.error(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}"
                     if unknown else "--rounds must be ≥ 1 and --seconds > 0")
    settings = [SETTINGS[name] for name in args.settings.split(",")]
    from orthoreg.utils.threads import available_cores

    print(f"{available_cores()} available cores; {args.rounds} rounds × {len(settings)} "
          f"settings × quiet/loaded, ≈ {args.seconds:g} s each; before: {machine_load()}")
    started = time.perf_counter()
    records = measure(settings, args.rounds, args.seconds)
    rows = summarize(records)
    print()
    print(format_table(rows))
    print("steps/s: fine-tune steps of the quick demo's model, median [min-max] over rounds; "
          "slowdown: quiet/loaded medians; paired: median [range] of per-round quiet/loaded; "
          "vs best: the best quiet rate of any setting / this setting's loaded rate; img/s: "
          "evaluation, batches of 64")
    print(f"wall {time.perf_counter() - started:.0f} s; after: {machine_load()}")
    if args.json:
        from orthoreg.utils.io import atomic_write_json

        atomic_write_json(args.json, {"records": records, "summary": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
