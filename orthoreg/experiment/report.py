"""results.json → report.md and PNG plots. Shows whatever the numbers are."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

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


def verdicts(results: dict[str, Any]) -> list[str]:
    """One plain sentence per paradigm: did OrthoReg beat the equally tuned baseline?"""
    by = {(r["paradigm"], r["variant"]): r for r in results["summary"]}
    out = []
    for paradigm in dict.fromkeys(r["paradigm"] for r in results["summary"]):
        base, ortho = by.get((paradigm, "baseline")), by.get((paradigm, "orthoreg"))
        if not base or not ortho:
            continue
        diff = (ortho["addition_abs"] - base["addition_abs"]) * 100
        spread = max(base["addition_abs_std"], ortho["addition_abs_std"]) * 100
        if abs(diff) < 0.05:
            word = "no difference"
        elif ortho["seeds"] > 1 and abs(diff) <= spread:
            word = "no clear difference (within the seed spread)"
        else:
            word = "OrthoReg better" if diff > 0 else "OrthoReg worse"
            if ortho["seeds"] == 1:
                word += "; one seed, so the size of the noise is unknown"
        out.append(
            f"- **{paradigm}**: task addition {base['addition_abs'] * 100:.1f} → "
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


def write_plots(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    summary = results["summary"]
    paradigms = list(dict.fromkeys(r["paradigm"] for r in summary))
    by = {(r["paradigm"], r["variant"]): r for r in summary}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, title) in zip(axes, [("addition_abs", "task addition (abs, test)"),
                                          ("addition_norm", "task addition (normalized, test)"),
                                          ("negation_target", "negation target acc (↓)")]):
        for offset, variant in ((-0.2, "baseline"), (0.2, "orthoreg")):
            rows = [by.get((p, variant)) for p in paradigms]
            xs = [i + offset for i, r in enumerate(rows) if r]
            ys = [r[metric] * 100 for r in rows if r]
            errs = [r[metric + "_std"] * 100 for r in rows if r]
            ax.bar(xs, ys, width=0.4, yerr=errs, capsize=3, label=variant)
        ax.set_xticks(range(len(paradigms)), paradigms)
        ax.set_title(title)
        ax.set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    _save_png(fig, out / "bars.png")
    plt.close(fig)
    files.append("bars.png")

    first_seed = min(r["seed"] for r in results["runs"])
    fig, axes = plt.subplots(1, len(paradigms), figsize=(3.6 * len(paradigms), 3.2),
                             squeeze=False)
    for ax, paradigm in zip(axes[0], paradigms):
        for run in results["runs"]:
            curve = run["addition"].get("val_curve")
            if run["paradigm"] != paradigm or run["seed"] != first_seed or not curve:
                continue
            ax.plot(curve["alphas"], [v * 100 for v in curve["norm"]],
                    label=f"{run['variant']} (λ={run['lambda']:g})")
        ax.set_title(paradigm)
        ax.set_xlabel("α")
        ax.set_ylabel("val normalized acc (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, out / "alpha_curves.png")
    plt.close(fig)
    files.append("alpha_curves.png")

    runs = [r for r in results["runs"] if r["seed"] == first_seed]
    fig, axes = plt.subplots(2, len(paradigms), figsize=(3.2 * len(paradigms), 6), squeeze=False)
    tasks = results["tasks"]
    for col, paradigm in enumerate(paradigms):
        for row, variant in enumerate(("baseline", "orthoreg")):
            ax = axes[row][col]
            match = [r for r in runs if r["paradigm"] == paradigm and r["variant"] == variant]
            if not match:
                ax.axis("off")
                continue
            image = ax.imshow(match[0]["cosine_matrix"], vmin=-0.2, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(len(tasks)), tasks, rotation=60, fontsize=7)
            ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
            ax.set_title(f"{paradigm} / {variant}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine(τ_i, τ_j)")
    _save_png(fig, out / "cosines.png")
    plt.close(fig)
    files.append("cosines.png")
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
            lines.append(f"- {paradigm} / {variant}: {grid} → chose lr={choice['lr']:.2g}, "
                         f"λ={choice['lambda']:g}")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
