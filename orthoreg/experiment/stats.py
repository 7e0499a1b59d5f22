"""Seed statistics for the report: paired differences between two variants of a run.

Why paired: two variants of the same seed share its data order and initial state, so the
per-seed difference removes the seed's own luck, which the two groups' separate stds (the
summary's ± columns) count twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: two-sided 95 % quantiles of Student's t by degrees of freedom (df > 30: the df = 30 value,
#: slightly conservative); a table, so the report needs no statistics package
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _addition_abs(run: dict[str, Any]) -> float:
    return float(run["addition"]["abs"])


def paired_difference(runs: list[dict[str, Any]], paradigm: str, variant: str,
                      reference: str = "baseline",
                      get: Callable[[dict[str, Any]], float] = _addition_abs,
                      ) -> dict[str, Any] | None:
    """``variant`` − ``reference`` per seed: the differences, their mean and std, and the
    95 % t interval of the mean. None when fewer than two seeds have both (or ``get`` finds
    no value: a measurement the run did not make)."""
    by_seed: dict[str, dict[int, float]] = {reference: {}, variant: {}}
    for run in runs:
        if run["paradigm"] == paradigm and run["variant"] in by_seed:
            try:
                by_seed[run["variant"]][run["seed"]] = float(get(run))
            except (KeyError, TypeError, IndexError):
                return None
    seeds = sorted(set(by_seed[reference]) & set(by_seed[variant]))
    if len(seeds) < 2:
        return None
    diffs = [by_seed[variant][s] - by_seed[reference][s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    std = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = _T975[min(n - 1, len(_T975)) - 1] * std / n ** 0.5
    return {"seeds": seeds, "per_seed": diffs, "mean": mean, "std": std,
            "ci": (mean - half, mean + half)}
