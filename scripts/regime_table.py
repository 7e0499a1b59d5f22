"""The end-of-training regime of every cached seed-0 fine-tune of the mechanism runs.

Reads the stage records (``stages/finetune-*/result.json``) of the given run directories and
prints a Markdown table, one row per (paradigm, variant, lr, λ), averaged over tasks: the
single-task validation accuracy and, at the last logged step, the largest σ(ΔW) over the
penalised matrices, the median over matrices of σ_max, the mean R/√n, the total ‖ΔW‖_F and
the final gradient norm. Used for README's "What OrthoReg does, measured".

    python scripts/regime_table.py [RUN_DIR ...]
"""

from __future__ import annotations

import glob
import json
import statistics
import sys

DEFAULT_RUNS = ["runs/mechanism/default", "runs/mechanism-lora/default",
                "runs/mechanism/large", "runs/mechanism-lora/large"]
COLUMNS = ("val acc (single-task)", "σ_max end (largest)", "median σ_max", "R/√n", "‖ΔW‖_F",
           "final grad norm")


def rows(run_dirs: list[str]) -> dict[tuple, list[tuple]]:
    found: dict[tuple, list[tuple]] = {}
    for root in run_dirs:
        for path in glob.glob(root + "/stages/finetune-*/result.json"):
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            if not record.get("regime") or record["seed"] != 0:
                continue
            candidate, last = record["candidate"], record["regime"][-1]
            key = (record["paradigm"], candidate["variant"], candidate["lr"], candidate["lam"])
            found.setdefault(key, []).append((
                record["val_acc"] * 100, last["sigma_max"], last["sigma_max_median"],
                last["r_over_sqrt_n"], last["fro"], record["final"].get("grad_norm", float("nan"))))
    return found


def main(argv: list[str]) -> int:
    table = rows(argv or DEFAULT_RUNS)
    print("| paradigm | variant | lr | λ | tasks | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (5 + len(COLUMNS)))
    formats = (".1f", ".3f", ".4f", ".3f", ".2f", ".1f")
    for key in sorted(table):
        values = table[key]
        means = [statistics.fmean(v[i] for v in values) for i in range(len(COLUMNS))]
        cells = " | ".join(f"{m:{f}}" for m, f in zip(means, formats))
        print(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]:g} | {len(values)} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
