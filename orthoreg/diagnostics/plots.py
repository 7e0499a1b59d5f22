"""Figures for each link of the chain: TFS → orthogonality → disentanglement.

Every function draws from already computed results (no model), writes one PNG atomically
and returns its path. Baseline and OrthoReg always share axes and colour scales: a
comparison drawn on two scales is not a comparison.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orthoreg.diagnostics.disentanglement import DISK_RADIUS, DisentanglementMap
from orthoreg.diagnostics.specialization import SpecializationResult
from orthoreg.utils.io import atomic_write_bytes

#: one colour per variant, so every figure reads the same way
VARIANT_COLOURS = {"baseline": "tab:blue", "orthoreg": "tab:orange", "θ0": "tab:gray"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(label: str, index: int) -> str:
    return VARIANT_COLOURS.get(label.split()[0], f"C{index + 2}")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Render to memory, then write atomically (a reader never sees half a PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_disentanglement(maps: Mapping[str, DisentanglementMap], path: str | Path,
                         title: str = "") -> Path:
    """ξ(α1, α2) heatmaps side by side (one per variant) on one colour scale, with the disk."""
    plt = _pyplot()
    from matplotlib.patches import Circle

    labels = list(maps)
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels) + 1.2, 4.0),
                             squeeze=False, layout="constrained")
    vmax = max(max(float(m.xi.max()) for m in maps.values()), 1e-6)
    image = None
    for ax, label in zip(axes[0], labels):
        result = maps[label]
        alphas = result.alphas
        half = (alphas[1] - alphas[0]) / 2
        extent = (alphas[0] - half, alphas[-1] + half, alphas[0] - half, alphas[-1] + half)
        image = ax.imshow(result.xi.T.numpy(), origin="lower", extent=extent, vmin=0.0,
                          vmax=vmax, cmap="magma", aspect="equal")
        ax.add_patch(Circle((0, 0), DISK_RADIUS, fill=False, color="cyan", lw=1.2, ls="--"))
        ax.set_xlabel(f"α1 ({result.tasks[0]})")
        ax.set_ylabel(f"α2 ({result.tasks[1]})")
        ax.set_title(f"{label}: mean ξ in disk = {result.disk_mean():.3f}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.85, label="ξ(α1, α2)  (0 = disentangled)")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_spectra(reports: Mapping[str, Mapping[str, Any]], path: str | Path,
                 title: str = "") -> Path:
    """Left: R(ΔW) per layer; right: every layer's singular values (σ = 1 is orthogonal).

    ``reports`` maps a variant label to {task: orthogonality_report(...)}.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, (label, by_task) in enumerate(reports.items()):
        colour = _colour(label, index)
        for number, (task, report) in enumerate(by_task.items()):
            layers = report["layers"]
            style = "-" if number == 0 else ":"
            left.plot(range(len(layers)), [v["penalty"] for v in layers.values()], style,
                      marker="o", ms=2.5, color=colour, label=f"{label} / {task}", lw=1.2)
            if number:
                continue  # spectra of the first task only, or the plot turns to soup
            for layer_number, values in enumerate(v["singular_values"] for v in layers.values()):
                if len(values) < 2:
                    continue
                xs = [i / (len(values) - 1) for i in range(len(values))]
                right.plot(xs, [max(v, 1e-12) for v in values], color=colour, alpha=0.35, lw=0.8,
                           label=f"{label} / {task}" if layer_number == 0 else None)
    left.set_yscale("log")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("layer (matrix) index")
    left.set_ylabel("R(ΔW) = ‖G − I‖_F")
    left.legend(fontsize=7)
    right.axhline(1.0, color="black", lw=0.8, ls="--")
    right.set_yscale("log")
    right.set_xlabel("singular value rank (normalised per layer)")
    right.set_ylabel("σ_i(ΔW)")
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_angles(reports: Mapping[str, Mapping[str, Any]], path: str | Path,
                title: str = "") -> Path:
    """Histograms of the angles between columns of ΔW (the paper's Fig. 2), per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, (label, by_task) in enumerate(reports.items()):
        colour = _colour(label, index)
        for number, (task, report) in enumerate(by_task.items()):
            hist = report["angles"]
            if not hist["count"]:
                continue
            ax.stairs(hist["density"], hist["edges"], color=colour,
                      ls="-" if number == 0 else ":", label=f"{label} / {task}")
    ax.axvline(90.0, color="black", lw=0.8, ls="--")
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between columns of ΔW (degrees)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_specialization(results: Mapping[str, SpecializationResult], path: str | Path,
                        title: str = "") -> Path:
    """Per-layer Jaccard overlap of the specialized feature sets, against chance (dashed)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    first = next(iter(results.values()))
    pairs = list(first.overlap)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for index, (label, result) in enumerate(results.items()):
            values = [result.overlap[pair][layer] for layer in result.layers]
            ax.plot(range(len(values)), values, "-o", ms=2.5, color=_colour(label, index),
                    label=f"{label} (mean {result.mean_overlap(pair):.2f})")
        chance = [first.chance[pair][layer] for layer in first.layers]
        ax.plot(range(len(chance)), chance, "--", color="black", lw=0.8,
                label=f"chance (mean {first.mean_chance(pair):.2f})")
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer index (input features scored)")
        ax.set_ylabel(f"Jaccard(I_t), {first.share:.0%} of attribution")
        ax.set_title(f"{pair[0]} vs {pair[1]}", fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
