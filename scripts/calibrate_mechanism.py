"""Fix the mechanism sweep's free choices by stated rules, before any addition result is seen.

Two choices, two rules (also in orthoreg/configs/mechanism*.yaml), both decided on seed 0's
*validation* splits and single-task fine-tuning only — no task addition, no test data:

R1  the ``shape`` form's λ grid: the two largest adjacent values of 10^k, k = −3…0, whose
    mean single-task validation accuracy (base lr, default steps) is within 2 points of the
    λ = 0 run's; if fewer than two qualify, the two smallest.
R2  the larger-update setting: the smallest learning-rate multiplier m ∈ {3, 10, 30} (on
    every variant's base lr, steps unchanged) at which the paper form at λ = 1 ends
    single-task fine-tuning with σ_max(ΔW) ≥ 1 (largest over the penalised matrices, mean
    over tasks); if none reaches it, the largest m.

The fine-tunes are the sweep's own cached stages (same output directories), so the sweep
reuses them. Writes docs/results/mechanism/calibration.json.

    python scripts/calibrate_mechanism.py [--config mechanism] [--out runs/mechanism]
                                          [--paradigms full lora]

``--config``: a built-in config name or a YAML file (the text benchmark's forms use
docs/results/text/mechanism/mechanism_<paradigm>.yaml); only its seed 0 is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from orthoreg.cli.commands import resolve_config
from orthoreg.experiment import load_config
from orthoreg.experiment.pipeline import Candidate, Experiment
from orthoreg.utils.io import atomic_write_json
from orthoreg.utils.provenance import provenance

SHAPE_LADDER = (0.001, 0.01, 0.1, 1.0)
LR_MULTIPLIERS = (3.0, 10.0, 30.0)
TOLERANCE = 0.02
SIGMA_TARGET = 1.0


def _finetunes(experiment: Experiment, paradigm: str, candidate: Candidate) -> list[dict[str, Any]]:
    return [experiment.finetune(paradigm, candidate, 0, task)[1]
            for task in experiment.config.tasks]


def shape_grid(experiment: Experiment, paradigm: str) -> dict[str, Any]:
    lr = experiment.config.paradigms[paradigm].lr
    reference = statistics.fmean(
        r["val_acc"] for r in _finetunes(experiment, paradigm, Candidate("baseline", lr, 0.0)))
    ladder = {}
    for lam in SHAPE_LADDER:
        records = _finetunes(experiment, paradigm, Candidate("shape", lr, lam, "shape"))
        ladder[lam] = statistics.fmean(r["val_acc"] for r in records)
    ok = [lam for lam in SHAPE_LADDER if ladder[lam] >= reference - TOLERANCE]
    pairs = [(a, b) for a, b in itertools.pairwise(SHAPE_LADDER) if a in ok and b in ok]
    grid = list(pairs[-1]) if pairs else list(SHAPE_LADDER[:2])
    return {"baseline_val": reference, "ladder_val": ladder, "grid": grid}


def large_update(config: Any, out: Path, paradigm: str, log: Any) -> dict[str, Any]:
    figures = {}
    for m in LR_MULTIPLIERS:
        base = config.paradigms[paradigm]
        scaled = dataclasses.replace(
            config, paradigms={**config.paradigms,
                               paradigm: dataclasses.replace(base, lr=base.lr * m)})
        experiment = Experiment(scaled, out, log=log, progress=False)
        with experiment.ws:
            experiment._load()
            records = _finetunes(experiment, paradigm, Candidate("orthoreg", base.lr * m, 1.0))
        sigma = statistics.fmean(r["regime"][-1]["sigma_max"] for r in records)
        figures[m] = {"sigma_max_end": sigma,
                      "val_acc": statistics.fmean(r["val_acc"] for r in records)}
        if sigma >= SIGMA_TARGET:
            return {"per_multiplier": figures, "multiplier": m}
    return {"per_multiplier": figures, "multiplier": LR_MULTIPLIERS[-1]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mechanism",
                        help="built-in config name or YAML file whose seed 0 is calibrated")
    parser.add_argument("--out", default="runs/mechanism")
    parser.add_argument("--paradigms", nargs="+", default=["full", "lora"])
    parser.add_argument("--json", default="docs/results/mechanism/calibration.json",
                        help="where the figures go (one file per run: merge by paradigm)")
    parser.add_argument("--skip-large", action="store_true",
                        help="rule R1 only (R2's fine-tunes are the long part)")
    parser.add_argument("--skip-shape", action="store_true",
                        help="rule R2 only (R1's figures are already committed)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = load_config(resolve_config(args.config), {"seeds": [0]})
    out = Path(args.out)
    result: dict[str, Any] = {"rules": __doc__.split("\n\n")[1], "paradigms": {}}
    for paradigm in args.paradigms:
        result["paradigms"][paradigm] = {}
        if not args.skip_shape:
            experiment = Experiment(config, out / "default", log=print, progress=False)
            with experiment.ws:
                experiment._load()
                shape = shape_grid(experiment, paradigm)
            print(f"{paradigm}: shape ladder {shape['ladder_val']} vs λ=0 "
                  f"{shape['baseline_val']:.3f} → grid {shape['grid']}")
            result["paradigms"][paradigm]["shape"] = shape
        if not args.skip_large:
            large = large_update(config, out / "large", paradigm, print)
            print(f"{paradigm}: large-update multiplier {large['multiplier']} ({large})")
            result["paradigms"][paradigm]["large_update"] = large
    result["seconds"] = time.perf_counter() - started
    result["command"] = "python scripts/calibrate_mechanism.py " + " ".join(argv)
    result.update(provenance(0))
    path = Path(args.json)
    atomic_write_json(path, result)
    print(json.dumps({p: {"shape_grid": v.get("shape", {}).get("grid"),
                          "lr_multiplier": v.get("large_update", {}).get("multiplier")}
                      for p, v in result["paradigms"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
