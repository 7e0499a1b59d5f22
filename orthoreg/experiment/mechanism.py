"""The report's mechanism section: is a change orthogonality (structure) or magnitude?

OrthoReg's gradient at small ΔW is −(2/√n)·ΔW (plain form): a negative weight decay that
makes ΔW longer without shaping its spectrum. Only as singular values approach 1 does it
flatten the spectrum. This section puts side by side what tells the two apart:

- the *regime*: σ_max(ΔW) and R/√n over training (σ ≪ 1 and R/√n ≈ 1 mean the penalty
  never left its weight-decay regime);
- the *controls*: the ``shape`` form (scale-invariant: flattens the spectrum, never changes
  the size) and the ``growth`` form (the small-ΔW limit of the paper form: size only);
- *norm-matched* task addition and ξ: every task vector rescaled to the baseline's norm,
  so "bigger" cannot pass for "more orthogonal";
- other merges (TIES, Iso-C): whether training-time and merge-time flattening add up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from orthoreg.experiment.stats import paired_difference

SavePng = Callable[[Any, Path], None]


def _cell(row: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    if key not in row:
        return "–"
    mean, std = row[key] * scale, row.get(key + "_std", 0.0) * scale
    if row.get("seeds", 1) > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def has_mechanism(results: dict[str, Any]) -> bool:
    return any(("regime" in r) or ("norm_matched" in r) or ("merges" in r) or ("xi" in r)
               for r in results["runs"])


def mechanism_table(results: dict[str, Any]) -> str:
    """One row per (paradigm, variant): accuracy, size, alignment, ξ, regime, raw vs matched."""
    merges = sorted({m for r in results["runs"] for m in r.get("merges", {})})
    head = ["paradigm", "variant", "form", "λ", "fine-tuned", "addition abs",
            *[f"{m} abs" for m in merges], "matched addition abs", "cosine", "‖τ‖",
            "ξ", "matched ξ", "σ_max end", "R/√n end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["summary"]:
        cells = [row["paradigm"], row["variant"], row.get("form", "paper"), f"{row['lambda']:g}",
                 _cell(row, "finetuned_acc"), _cell(row, "addition_abs"),
                 *[_cell(row, f"{m}_abs") for m in merges],
                 _cell(row, "matched_addition_abs"), _cell(row, "cosine_mean", 1.0, 3),
                 _cell(row, "vector_norm", 1.0, 2), _cell(row, "xi", 1.0, 3),
                 _cell(row, "matched_xi", 1.0, 3), _cell(row, "sigma_max_final", 1.0, 3),
                 _cell(row, "r_over_sqrt_n_final", 1.0, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: (column, how to read it from a run, scale): what the paired table compares
_PAIRED_METRICS: tuple[tuple[str, Callable[[dict[str, Any]], float], float, int], ...] = (
    ("addition abs", lambda r: r["addition"]["abs"], 100.0, 1),
    ("matched addition abs", lambda r: r["norm_matched"]["addition"]["abs"], 100.0, 1),
    ("cosine", lambda r: r["cosine_mean"], 1.0, 3),
    ("ξ", lambda r: r["xi"]["mean"], 1.0, 3),
    ("matched ξ", lambda r: r["norm_matched"]["xi"]["mean"], 1.0, 3),
)


def paired_table(results: dict[str, Any]) -> str:
    """Per paradigm, each variant − the baseline and the paper form − its size-only control
    (``growth``), seed by seed: mean difference and 95 % t interval. Empty with one seed.

    The second comparison is the direct test of the mechanism: if the paper form did
    anything beyond lengthening ΔW, it shows as a difference from ``growth``, whose gradient
    is the paper form's small-ΔW limit.
    """
    runs = results["runs"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    pairs = [(v, "baseline") for v in variants if v != "baseline"]
    if "orthoreg" in variants and "growth" in variants:
        pairs.append(("orthoreg", "growth"))
    head = ["paradigm", "comparison", "seeds", *[m[0] for m in _PAIRED_METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    found = False
    for paradigm in dict.fromkeys(r["paradigm"] for r in runs):
        for variant, reference in pairs:
            cells, count = [], 0
            for _, get, scale, digits in _PAIRED_METRICS:
                d = paired_difference(runs, paradigm, variant, reference, get)
                if d is None:
                    cells.append("–")
                    continue
                count = len(d["seeds"])
                low, high = (x * scale for x in d["ci"])
                mark = " *" if low > 0 or high < 0 else ""
                cells.append(f"{d['mean'] * scale:+.{digits}f} [{low:+.{digits}f}, "
                             f"{high:+.{digits}f}]{mark}")
            if count:
                found = True
                lines.append(f"| {paradigm} | {variant} − {reference} | {count} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines) if found else ""


def plot_regime(out: Path, results: dict[str, Any], save_png: SavePng) -> list[str]:
    """Per paradigm: σ_max (largest over matrices), median σ_max and R/√n against steps,
    one line per variant (first seed, mean over tasks), with σ = 1 drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first_seed = min(r["seed"] for r in results["runs"])
    files = []
    for paradigm in dict.fromkeys(r["paradigm"] for r in results["runs"]):
        runs = [r for r in results["runs"]
                if r["paradigm"] == paradigm and r["seed"] == first_seed and r.get("regime")]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
        panels = [("sigma_max", "largest σ(ΔW) over matrices"),
                  ("sigma_max_median", "median over matrices of σ_max(ΔW)"),
                  ("r_over_sqrt_n", "mean R(ΔW)/√n")]
        for run in runs:
            # a fine-tune resumed from a checkpoint logs only the steps after the resume:
            # average over the steps every task has
            by_step = [{point["step"]: point for point in s} for s in run["regime"].values()]
            steps = sorted(set.intersection(*(set(points) for points in by_step)))
            for ax, (key, _) in zip(axes, panels):
                values = [sum(p[step][key] for p in by_step) / len(by_step) for step in steps]
                ax.plot(steps, values, marker="o", markersize=3,
                        label=f"{run['variant']} (λ={run['lambda']:g})")
        for ax, (key, title) in zip(axes, panels):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if key == "r_over_sqrt_n":
                ax.ticklabel_format(axis="y", useOffset=False)
            else:
                ax.set_yscale("log")
                ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
                ax.text(ax.get_xlim()[0], 1.0, " σ = 1", va="bottom", fontsize=8)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{paradigm}: where the penalty acts (seed {first_seed}, mean over tasks)")
        name = f"regime_{paradigm}.png"
        save_png(fig, out / name)
        plt.close(fig)
        files.append(name)
    return files


def mechanism_section(out: Path, results: dict[str, Any], save_png: SavePng) -> list[str]:
    """The report lines of the mechanism section (empty when the run measured none of it);
    ``save_png(fig, path)`` writes a figure (the report's atomic writer)."""
    if not has_mechanism(results):
        return []
    plots = plot_regime(out, results, save_png)
    return [
        "## Mechanism: structure or magnitude",
        "",
        "Test accuracies in %. *matched*: every task vector rescaled to the norm of the "
        "baseline's vector of the same task and seed before the α search (validation) — "
        "a variant cannot win there by being longer. ξ: mean weight-disentanglement error over "
        "the unit disk of (α1, α2), averaged over task pairs (validation inputs; lower is "
        "better). σ_max end / R/√n end: at the last step, largest singular value of ΔW over "
        "the penalised matrices and the mean R(ΔW)/√n (≈ 1 means the penalty is in its "
        "small-ΔW, weight-decay regime).",
        "",
        mechanism_table(results),
        "",
        *_paired_lines(results),
        *[f"![{p}]({p})" for p in plots],
        "",
    ]


def _paired_lines(results: dict[str, Any]) -> list[str]:
    table = paired_table(results)
    if not table:
        return []
    return ["**Paired differences** (same seed; mean and 95 % t interval over seeds; "
            "accuracies in points; * where the interval excludes 0). `orthoreg − growth` "
            "is the paper form against its size-only control: structure beyond size.",
            "", table, ""]
