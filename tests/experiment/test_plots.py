"""The report's plots are readable at a glance, checked on the committed benchmark results.

Dot plots zoomed to the data (the title says the axis does not start at 0), whiskers only
with more than one seed; cosine maps with the diagonal masked, a colour scale fitted to
the off-diagonal values, a number in every off-diagonal cell, short tick labels that stay
out of neighbouring panels.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from orthoreg.experiment import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend

RESULTS = Path(__file__).resolve().parents[2] / "docs/results/embedded/results.json"


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text())


def one_seed(results: dict[str, Any]) -> dict[str, Any]:
    """The same results as a single-seed run would report them."""
    single = copy.deepcopy(results)
    first = min(run["seed"] for run in single["runs"])
    single["runs"] = [run for run in single["runs"] if run["seed"] == first]
    for row in single["summary"]:
        row["seeds"] = 1
        for key in [k for k in row if k.endswith("_std")]:
            row[key] = 0.0
    return single


@pytest.fixture
def figures():
    made = []
    yield made
    for fig in made:
        plt.close(fig)


def title(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle else ""


def test_write_plots_writes_every_png(tmp_path: Path, results):
    files = report.write_plots(tmp_path, results)
    assert files == ["bars.png", "alpha_curves.png", "cosines.png"]
    for name in files:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dots_are_zoomed_to_the_data_and_say_so(results, figures):
    fig = report._dot_plot(plt, results)
    figures.append(fig)
    assert "not from 0" in title(fig) and "3 seeds" in title(fig)
    for ax, (metric, _) in zip(fig.axes, report._DOT_METRICS):
        means = [row[metric] * 100 for row in results["summary"]]
        low, high = ax.get_ylim()
        # the 0–2 point differences fill the panel: the axis spans the data, not 0…max
        assert min(means) - 8 < low < min(means) and max(means) < high < max(means) + 8
        assert high - low < 3 * (max(means) - min(means)) + 10


def test_whiskers_only_with_more_than_one_seed(results, figures):
    many, single = report._dot_plot(plt, results), report._dot_plot(plt, one_seed(results))
    figures += [many, single]
    for fig, expect_whiskers in ((many, True), (single, False)):
        containers = [c for ax in fig.axes for c in ax.containers
                      if isinstance(c, ErrorbarContainer)]
        assert containers and all(c.has_yerr == expect_whiskers for c in containers)
    assert "1 seed" in title(single) and "1 seed" not in title(many)


def test_dots_are_labelled_with_the_difference_to_the_baseline(results, figures):
    fig = report._dot_plot(plt, results)
    figures.append(fig)
    by = {(r["paradigm"], r["variant"]): r for r in results["summary"]}
    expected = {f"{(by[p, 'orthoreg'][m] - by[p, 'baseline'][m]) * 100:+.1f}"
                for p in ("full", "lora") for m in ("addition_abs",)}
    labels = {text.get_text() for text in fig.axes[0].texts}
    assert expected <= labels


def test_cosine_maps_mask_the_diagonal_and_fit_the_scale(results, figures):
    fig = report._cosine_maps(plt, results)
    figures.append(fig)
    size = len(results["tasks"])
    first = min(run["seed"] for run in results["runs"])
    off = ~np.eye(size, dtype=bool)
    values = np.concatenate([np.asarray(run["cosine_matrix"])[off]
                             for run in results["runs"] if run["seed"] == first])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len({(r["paradigm"], r["variant"]) for r in results["summary"]})
    for ax in panels:
        image = ax.images[0]
        shown = np.ma.masked_invalid(image.get_array())
        assert shown.mask[~off].all() and not shown.mask[off].any()
        low, high = image.get_clim()
        assert low == pytest.approx(values.min()) and high == pytest.approx(values.max())
        numbers = [text.get_text() for text in ax.texts]
        assert len(numbers) == size * (size - 1)  # every off-diagonal cell has its value
        assert all(abs(float(n)) <= 1 for n in numbers)
        ax_values = sorted(float(n) for n in numbers)
        assert ax_values == pytest.approx(sorted(shown.compressed()), abs=6e-4)


def test_cosine_tick_labels_are_short_and_stay_in_their_panel(results, figures):
    fig = report._cosine_maps(plt, results)
    figures.append(fig)
    assert fig.get_layout_engine() is not None  # constrained layout
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.images]
    for ax in panels:
        labels = [t for t in ax.get_xticklabels() + ax.get_yticklabels()
                  if t.get_visible() and t.get_text()]
        assert all(len(t.get_text()) <= 8 for t in labels)
        for label in labels:
            box = label.get_window_extent(renderer)
            for other in panels:
                if other is not ax:
                    assert not box.overlaps(other.get_window_extent(renderer)), label.get_text()


def test_short_names_drop_the_shared_word_and_stay_unique():
    assert report._short_names(["mnist", "fashion_mnist", "animal_mnist"]) == [
        "mnist", "fashion", "animal"]
    assert report._short_names(["Cars", "DTD", "SUN397"]) == ["Cars", "DTD", "SUN397"]
    assert report._short_names(["verylongname_a", "verylongname_b"]) == ["a", "b"]
    clash = report._short_names(["abcdefghij1", "abcdefghij2"])
    assert len(set(clash)) == 2 and all(len(name) <= 8 for name in clash)


def test_a_single_task_run_still_gets_every_plot(tmp_path: Path, results):
    """One task has no pair to compare: the cosine map is drawn empty, not an error."""
    single = one_seed(results)
    single["tasks"] = single["tasks"][:1]
    for run in single["runs"]:
        run["cosine_matrix"] = [[1.0]]
    assert report.write_plots(tmp_path, single) == ["bars.png", "alpha_curves.png",
                                                    "cosines.png"]
