"""results.json → report.md and PNG plots. Shows whatever the numbers are."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from orthoreg.experiment.mechanism import mechanism_section
from orthoreg.experiment.stats import paired_difference
from orthoreg.utils.io import atomic_write_bytes, atomic_write_text


def _pm(row: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = row[key] * scale, row.get(key + "_std", 0.0) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if row["seeds"] > 1 else f"{mean:.{digits}f}"


def summary_table(results: dict[str, Any]) -> str:
    lines = [
        "| paradigm | variant | λ | lr | pretrained | fine-tuned | addition abs | addition norm "
        "| α | negation target ↓ | negation control | cosine | ‖τ‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        lines.append(
            f"| {row['paradigm']} | {row['variant']} | {row['lambda']:g} | {row['lr']:.2g} "
            f"| {_pm(row, 'pretrained_acc')} | {_pm(row, 'finetuned_acc')} "
            f"| {_pm(row, 'addition_abs')} | {_pm(row, 'addition_norm')} "
            f"| {_pm(row, 'addition_alpha', 1.0, 2)} | {_pm(row, 'negation_target')} "
            f"| {_pm(row, 'negation_control')} | {_pm(row, 'cosine_mean', 1.0, 3)} "
            f"| {_pm(row, 'vector_norm', 1.0, 2)} |"
        )
    return "\n".join(lines)


def pretrained_table(results: dict[str, Any]) -> list[str]:
    """Per task, the pretrained model's accuracy under the frozen heads (for zero-shot heads:
    the zero-shot accuracy) and what the family said about its data (e.g. truncated texts)."""
    info = results.get("data_info", {})
    lines = ["## Pretrained (zero-shot) accuracy per task", "",
             "| task | val | test | data |", "|---|---|---|---|"]
    for task, acc in results["pretrained"].items():
        notes = "; ".join(f"{k}: {v}" for k, v in info.get(task, {}).items()) or "–"
        lines.append(f"| {task} | {acc['val'] * 100:.1f} | {acc['test'] * 100:.1f} | {notes} |")
    return [*lines, ""]


def verdicts(results: dict[str, Any]) -> list[str]:
    """One plain sentence per paradigm and variant: did it beat the equally tuned baseline?

    With two or more seeds the word comes from the paired difference of task addition
    (variant − baseline, same seed): "better"/"worse" only when its 95 % t interval excludes
    zero. With one seed the difference is printed with the warning that its noise is unknown.
    """
    by = {(r["paradigm"], r["variant"]): r for r in results["summary"]}
    out = []
    for paradigm, variant in by:
        base, ortho = by.get((paradigm, "baseline")), by[(paradigm, variant)]
        if not base or variant == "baseline":
            continue
        name = "OrthoReg" if variant == "orthoreg" else f"the {variant} form"
        diff = (ortho["addition_abs"] - base["addition_abs"]) * 100
        paired = paired_difference(results["runs"], paradigm, variant)
        if paired is not None:
            low, high = (x * 100 for x in paired["ci"])
            per_seed = ", ".join(f"{d * 100:+.1f}" for d in paired["per_seed"])
            verdict = (f"{name} better" if low > 0 else f"{name} worse" if high < 0
                       else "no clear difference")
            word = (f"{verdict}: paired over {len(paired['seeds'])} seeds "
                    f"{paired['mean'] * 100:+.1f} ± {paired['std'] * 100:.1f}, 95 % CI "
                    f"[{low:+.1f}, {high:+.1f}]; per seed {per_seed}")
        elif abs(diff) < 0.05:
            word = "no difference"
        else:
            word = f"{name} better" if diff > 0 else f"{name} worse"
            word += "; one seed, so the size of the noise is unknown"
        label = paradigm if variant == "orthoreg" else f"{paradigm} / {variant}"
        out.append(
            f"- **{label}**: task addition {base['addition_abs'] * 100:.1f} → "
            f"{ortho['addition_abs'] * 100:.1f} ({diff:+.1f} points; {word}); normalized "
            f"{base['addition_norm'] * 100:.1f} → {ortho['addition_norm'] * 100:.1f}; "
            f"negation target {base['negation_target'] * 100:.1f} → "
            f"{ortho['negation_target'] * 100:.1f}; mean cosine {base['cosine_mean']:.3f} → "
            f"{ortho['cosine_mean']:.3f}; ‖τ‖ {base['vector_norm']:.2f} → "
            f"{ortho['vector_norm']:.2f}."
        )
    return out


def _save_png(fig: Any, path: Path) -> None:
    """Render in memory, then write atomically: a killed run never leaves half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


#: (results key, panel title): the three headline numbers, one dot plot each
_DOT_METRICS = (("addition_abs", "task addition, absolute ↑"),
                ("addition_norm", "task addition, normalized ↑"),
                ("negation_target", "negation: target accuracy ↓"))
#: baseline and OrthoReg keep their colours whatever other variants a run adds
_VARIANT_STYLE = {"baseline": ("tab:blue", "o"), "orthoreg": ("tab:orange", "D")}
_OTHER_STYLES = (("tab:green", "s"), ("tab:purple", "^"), ("tab:brown", "v"), ("tab:pink", "P"))


def _variants(summary: list[dict[str, Any]]) -> list[str]:
    """Variants in the order the run lists them, the baseline first (the reference)."""
    found = list(dict.fromkeys(row["variant"] for row in summary))
    return sorted(found, key=lambda variant: variant != "baseline")


def _variant_style(variant: str, variants: list[str]) -> tuple[str, str]:
    others = [v for v in variants if v not in _VARIANT_STYLE]
    if variant in _VARIANT_STYLE:
        return _VARIANT_STYLE[variant]
    return _OTHER_STYLES[others.index(variant) % len(_OTHER_STYLES)]


def _seed_count(rows: list[dict[str, Any]]) -> str:
    counts = sorted({int(row["seeds"]) for row in rows})
    if counts[-1] == 1:
        return "1 seed"
    return f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds"


def _short_names(names: list[str], width: int = 8) -> list[str]:
    """Tick labels that fit under a heatmap column: drop the word every name shares
    (``fashion_mnist`` → ``fashion``), then cut to ``width``; T1, T2, … if that collides.
    """
    words = [name.split("_") for name in names]
    shared = set.intersection(*(set(w) for w in words)) if len(names) > 1 else set()
    short = []
    for parts in words:
        kept = [part for part in parts if part not in shared] or parts
        label = "_".join(kept)
        short.append(label if len(label) <= width else label[: width - 1] + "…")
    return short if len(set(short)) == len(short) else [f"T{i + 1}" for i in range(len(names))]


def _dot_plot(plt: Any, results: dict[str, Any]) -> Any:
    """Mean ± std per paradigm and variant as dots on axes zoomed to the data.

    Dots, not bars: a bar's length is read from 0, so its axis must start there and the
    0–2 point differences that matter vanish; a dot is read by position, so the axis can
    zoom (the title says so). Whiskers only where there is more than one seed (a single
    seed has no spread, and a zero-length whisker reads as "no noise"). Each non-baseline
    dot is labelled with its difference to the baseline in points.
    """
    summary = results["summary"]
    paradigms = list(dict.fromkeys(row["paradigm"] for row in summary))
    variants = _variants(summary)
    by = {(row["paradigm"], row["variant"]): row for row in summary}
    step = min(0.28, 0.6 / len(variants))  # dots of one paradigm sit side by side
    fig, axes = plt.subplots(1, len(_DOT_METRICS), figsize=(4.2 * len(_DOT_METRICS), 3.6),
                             layout="constrained")
    for ax, (metric, title) in zip(axes, _DOT_METRICS):
        labelled: set[str] = set()  # one legend entry per variant
        for index, variant in enumerate(variants):
            color, marker = _variant_style(variant, variants)
            offset = (index - (len(variants) - 1) / 2) * step
            for position, paradigm in enumerate(paradigms):
                row = by.get((paradigm, variant))
                if row is None:
                    continue
                mean = row[metric] * 100
                spread = row.get(metric + "_std", 0.0) * 100 if row["seeds"] > 1 else None
                ax.errorbar(position + offset, mean, yerr=spread, fmt=marker, color=color,
                            markersize=6, capsize=3, elinewidth=1.2,
                            label=None if variant in labelled else variant)
                labelled.add(variant)
                base = by.get((paradigm, "baseline"))
                if variant != "baseline" and base is not None:
                    ax.annotate(f"{mean - base[metric] * 100:+.1f}", (position + offset, mean),
                                xytext=(6, 0), textcoords="offset points", va="center",
                                fontsize=8, color=color, zorder=5,
                                bbox={"boxstyle": "square,pad=0.05", "fc": "white",
                                      "ec": "none", "alpha": 0.8})
        ax.set_xticks(range(len(paradigms)), paradigms)
        ax.set_xlim(-0.5, len(paradigms) - 0.3)  # room for the last difference label
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(variants), frameon=False)
    spread = ("dot: mean, whisker: ±1 std" if any(row["seeds"] > 1 for row in summary)
              else "no spread shown")
    fig.suptitle(f"test accuracy, {_seed_count(summary)} ({spread}; +x: points vs the "
                 "baseline)\ny-axes zoomed to the data, not from 0", fontsize=10)
    return fig


def _alpha_curves(plt: Any, results: dict[str, Any]) -> Any:
    """Validation normalized accuracy along α, one panel per paradigm (first seed)."""
    paradigms = list(dict.fromkeys(row["paradigm"] for row in results["summary"]))
    variants = _variants(results["summary"])
    first_seed = min(run["seed"] for run in results["runs"])
    fig, axes = plt.subplots(1, len(paradigms), figsize=(3.6 * len(paradigms), 3.2),
                             squeeze=False, layout="constrained")
    for ax, paradigm in zip(axes[0], paradigms):
        for run in results["runs"]:
            curve = run["addition"].get("val_curve")
            if run["paradigm"] != paradigm or run["seed"] != first_seed or not curve:
                continue
            ax.plot(curve["alphas"], [v * 100 for v in curve["norm"]],
                    color=_variant_style(run["variant"], variants)[0],
                    label=f"{run['variant']} (λ={run['lambda']:g})")
        ax.set_title(paradigm)
        ax.set_xlabel("α")
        ax.set_ylabel("val normalized acc (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"task addition along α (validation, seed {first_seed})", fontsize=10)
    return fig


def _cosine_maps(plt: Any, results: dict[str, Any]) -> Any:
    """Pairwise cosines of the task vectors, a heatmap per paradigm × variant (first seed).

    The diagonal (always 1) is masked and the colour scale spans the off-diagonal values
    of all panels alone, so 0.00–0.11 is the whole range and not a sliver of −0.2…1;
    every cell carries its number, so no value is read off the colour bar.
    """
    import numpy as np

    summary = results["summary"]
    paradigms = list(dict.fromkeys(row["paradigm"] for row in summary))
    variants = _variants(summary)
    first_seed = min(run["seed"] for run in results["runs"])
    matrices = {(run["paradigm"], run["variant"]): np.asarray(run["cosine_matrix"], float)
                for run in results["runs"] if run["seed"] == first_seed}
    tasks = results["tasks"]
    size = len(tasks)
    off_diagonal = ~np.eye(size, dtype=bool)
    values = np.concatenate([m[off_diagonal] for m in matrices.values()] or [np.zeros(0)])
    # one task has no pair: nothing to scale to, the panels show the masked diagonal alone
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if high - low < 1e-3:
        low, high = low - 0.01, high + 0.01
    digits = 2 if high - low >= 0.2 else 3
    font = 8 if size <= 4 else 6 if size <= 8 else 5
    cell = max(0.55, 2.4 / size)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e8e8e8")  # the masked diagonal
    norm = plt.Normalize(low, high)
    fig, axes = plt.subplots(len(variants), len(paradigms), sharex=True, sharey=True,
                             figsize=(cell * size * len(paradigms) + 1.6,
                                      cell * size * len(variants) + 1.2),
                             squeeze=False, layout="constrained")
    labels = _short_names(tasks)
    image = None
    for row_index, variant in enumerate(variants):
        for col_index, paradigm in enumerate(paradigms):
            ax = axes[row_index][col_index]
            matrix = matrices.get((paradigm, variant))
            if matrix is None:
                ax.axis("off")
                continue
            masked = np.where(off_diagonal, matrix, np.nan)
            image = ax.imshow(masked, cmap=cmap, norm=norm)
            for i, j in zip(*np.nonzero(off_diagonal)):
                red, green, blue, _ = cmap(norm(matrix[i, j]))
                ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(j, i, f"{matrix[i, j]:.{digits}f}", ha="center", va="center",
                        fontsize=font, color=ink)
            ax.set_xticks(range(size), labels, fontsize=font)
            ax.set_yticks(range(size), labels, fontsize=font)
            ax.tick_params(length=0)
            ax.set_title(f"{paradigm} / {variant}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine(τᵢ, τⱼ), off-diagonal")
    note = ", ".join(f"{short} = {full}" for short, full in zip(labels, tasks) if short != full)
    note = note or ("" if values.size else "one task: no pair to compare")
    fig.suptitle(f"pairwise cosine of task vectors (seed {first_seed}; diagonal = 1, masked)"
                 + (f"\n{note}" if note else ""), fontsize=9)
    return fig


#: file name → figure builder; every plot of the report, in the order it shows them
_PLOTS = {"bars.png": _dot_plot, "alpha_curves.png": _alpha_curves,
          "cosines.png": _cosine_maps}


def write_plots(out: Path, results: dict[str, Any]) -> list[str]:
    """Render every plot of ``_PLOTS`` from ``results`` into ``out``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, build in _PLOTS.items():
        fig = build(plt, results)
        try:
            _save_png(fig, out / name)
        finally:
            plt.close(fig)
        files.append(name)
    return files


def write_report(out: str | Path, results: dict[str, Any]) -> Path:
    out = Path(out)
    plots = write_plots(out, results)
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [
        f"# orthoreg report — {results['name']}",
        "",
        f"Model `{results['model']}`; tasks {', '.join(results['tasks'])}; negation control "
        f"`{results['control']}`; seeds {seeds}; merge `{results['config']['merge']}`; "
        f"git {results.get('git_commit')}; total {results['timings']['total']:.0f} s.",
        "",
        "Accuracies in % on the test splits (mean ± std over seeds). α, λ and the baseline's "
        "learning rate were chosen on validation splits only. Negation: target accuracy at the "
        f"α that keeps control accuracy ≥ {results['config']['negation_thresholds'][0]:.2f} × "
        "pretrained.",
        "",
        summary_table(results),
        "",
        *pretrained_table(results),
        "## Verdict per paradigm",
        "",
        *verdicts(results),
        "",
        "## Selection grids (validation, first seed)",
        "",
    ]
    for paradigm, variants in results["selection"].items():
        for variant, choice in variants.items():
            grid = ", ".join(f"lr={g['lr']:.2g} λ={g['lambda']:g}: {g['val_abs'] * 100:.1f}"
                             for g in choice["grid"])
            origin = choice.get("pinned_from")
            pinned = (f" (pinned from run {origin.get('name')!r}, seeds {origin.get('seeds')}, "
                      f"git {origin.get('git_commit')})" if origin else "")
            lines.append(f"- {paradigm} / {variant}: {grid} → chose lr={choice['lr']:.2g}, "
                         f"λ={choice['lambda']:g}{pinned}")
    lines += ["", *mechanism_section(out, results, _save_png)]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
