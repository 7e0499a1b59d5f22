"""Diagnose a finished experiment directory: ``orthoreg diagnose --run DIR``.

A run directory (``orthoreg demo`` / :class:`~orthoreg.experiment.Experiment`) holds
``config.json``, ``results.json`` and cached stages. Nothing is retrained: the backbone and
the tasks' data and frozen heads are rebuilt by the experiment's own loader (so they are
exactly what the run used), and each selected run's task vectors are read from the
fine-tuning stage whose ``result.json`` record names the same task, paradigm, variant,
learning rate, λ and seed. Results go next to the report: ``diagnostics.json``,
``diag_*.png``, ``diagnostics.md``, and a "Diagnostics" section in ``report.md``
(replaced, not duplicated, when the diagnosis is rerun).

The diagnostics themselves are a small registry (:data:`SECTIONS`), one entry per link of
the paper's chain, each computed per paradigm for the baseline and the OrthoReg run side
by side.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthoreg.diagnostics.base import TaskProbe
from orthoreg.diagnostics.disentanglement import DISK_RADIUS, alpha_grid, disentanglement_error
from orthoreg.diagnostics.orthogonality import layer_cosines, orthogonality_report
from orthoreg.diagnostics.plots import (
    plot_angles,
    plot_disentanglement,
    plot_specialization,
    plot_spectra,
)
from orthoreg.diagnostics.specialization import (
    DEFAULT_OBJECTIVE,
    DEFAULT_SHARE,
    SpecializationResult,
    task_feature_specialization,
)
from orthoreg.errors import OrthoRegError
from orthoreg.evaluation.accuracy import to_jsonable
from orthoreg.evaluation.resident import ResidentModel
from orthoreg.taskvector import TaskVector
from orthoreg.utils.io import atomic_write_json, atomic_write_text

Log = Callable[[str], None]

#: markers around the section appended to report.md, so a rerun replaces it
BEGIN = "<!-- orthoreg diagnostics: begin -->"
END = "<!-- orthoreg diagnostics: end -->"


class RunDirectoryError(OrthoRegError):
    """A run directory lacks what a diagnosis needs (files, runs, matching stages)."""


@dataclass(frozen=True)
class DiagnoseOptions:
    """What to diagnose and how much data to spend on it (CLI flags map one to one)."""

    seed: int | None = None  # default: the run's first seed
    paradigms: tuple[str, ...] | None = None  # default: every paradigm in results.json
    points: int = 13
    extent: float = 3.0
    all_pairs: bool = False
    examples: int = 128  # per task, for ξ
    tfs_examples: int = 128  # per task, for TFS
    split: str = "test"
    share: float = DEFAULT_SHARE
    objective: str = DEFAULT_OBJECTIVE
    sections: tuple[str, ...] = ("orthogonality", "disentanglement", "specialization")


@dataclass
class Context:
    """Everything the sections share: the resident backbone, probes, vectors, outputs."""

    run_dir: Path
    name: str
    resident: ResidentModel
    probes: dict[str, TaskProbe]
    pairs: list[tuple[str, str]]
    runs: dict[str, dict[str, dict[str, Any]]]  # paradigm -> variant -> run record
    vectors: dict[str, dict[str, dict[str, TaskVector]]]  # paradigm -> variant -> task -> τ
    options: DiagnoseOptions
    log: Log
    cache: dict[str, Any] = field(default_factory=dict)

    def pair_key(self, pair: tuple[str, str]) -> str:
        return f"{pair[0]}|{pair[1]}"


#: (context, paradigm) -> (JSON part, markdown lines, PNG file names)
Section = Callable[[Context, str], tuple[dict[str, Any], list[str], list[str]]]
SECTIONS: dict[str, Section] = {}


def register_section(name: str) -> Callable[[Section], Section]:
    def decorate(section: Section) -> Section:
        if name in SECTIONS:
            raise ValueError(f"diagnostic section {name!r} is already registered")
        SECTIONS[name] = section
        return section

    return decorate


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{value:.{digits}f}"


# ------------------------------------------------------------------------- sections
@register_section("orthogonality")
def orthogonality_section(ctx: Context, paradigm: str) -> tuple[dict, list[str], list[str]]:
    """Cosines between the pair's vectors; per-layer R, spectra and column angles of each ΔW."""
    squared = bool(ctx.cache.get("squared", False))
    reports: dict[str, dict[str, Any]] = {}
    cosines: dict[str, dict[str, Any]] = {}
    for variant, by_task in ctx.vectors[paradigm].items():
        reports[variant] = {task: orthogonality_report(vector, squared=squared)
                            for task, vector in by_task.items()}
        cosines[variant] = {}
        for pair in ctx.pairs:
            first, second = by_task[pair[0]], by_task[pair[1]]
            cosines[variant][ctx.pair_key(pair)] = {"whole": first.cosine(second),
                                                    "layers": layer_cosines(first, second)}
    spectra = f"diag_spectra_{_slug(paradigm)}.png"
    angles = f"diag_angles_{_slug(paradigm)}.png"
    plot_spectra(reports, ctx.run_dir / spectra, f"{paradigm}: ΔW spectra and R(ΔW) per layer")
    plot_angles(reports, ctx.run_dir / angles, f"{paradigm}: angles between columns of ΔW")
    lines = ["| variant | task | ‖τ‖ | Σ_l R(ΔW_l) | median eff. rank / size | "
             "mean abs(angle − 90°) |", "|---|---|---|---|---|---|"]
    for variant, by_task in reports.items():
        for task, report in by_task.items():
            ratios = sorted(v["effective_rank"] / max(v["size"], 1)
                            for v in report["layers"].values())
            median = ratios[len(ratios) // 2] if ratios else float("nan")
            lines.append(f"| {variant} | {task} | {report['norm']:.3g} | "
                         f"{report['penalty_total']:.4g} | {_fmt(median, 2)} | "
                         f"{_fmt(report['angles']['mean_abs_deviation_from_90'], 1)}° |")
    if ctx.pairs:
        lines += ["", "| variant | pair | cos(τ1, τ2) | max abs per-layer cos |", "|---|---|---|---|"]
        for variant, by_pair in cosines.items():
            for key, value in by_pair.items():
                worst = max((abs(c) for c in value["layers"].values()), default=float("nan"))
                lines.append(f"| {variant} | {key.replace('|', ' / ')} | {value['whole']:+.4f} "
                             f"| {_fmt(worst)} |")
    lines += ["", f"![ΔW spectra]({spectra})", "", f"![column angles]({angles})"]
    return {"vectors": reports, "cosines": cosines}, lines, [spectra, angles]


@register_section("disentanglement")
def disentanglement_section(ctx: Context, paradigm: str) -> tuple[dict, list[str], list[str]]:
    """ξ(α1, α2) heatmaps (Ortiz-Jiménez et al. 2023), baseline and OrthoReg side by side."""
    if not ctx.pairs:
        return {}, ["ξ needs two tasks; this run has one."], []
    opts = ctx.options
    alphas = alpha_grid(opts.points, opts.extent)
    out: dict[str, Any] = {}
    files = []
    lines = [f"| pair | variant | mean ξ (α1² + α2² ≤ {DISK_RADIUS:g}) | max ξ | ξ(1, 1) | "
             "wall time |", "|---|---|---|---|---|---|"]
    for pair in ctx.pairs:
        maps = {}
        for variant, by_task in ctx.vectors[paradigm].items():
            ctx.log(f"  ξ {paradigm}/{variant} {pair[0]} × {pair[1]} "
                    f"({opts.points}×{opts.points} grid)")
            maps[variant] = disentanglement_error(
                ctx.resident, [ctx.probes[pair[0]], ctx.probes[pair[1]]],
                [by_task[pair[0]], by_task[pair[1]]], alphas, paradigm=paradigm,
                max_examples=opts.examples)
            result = maps[variant]
            at_one = _value_at(result.alphas, result.xi, 1.0, 1.0)
            lines.append(f"| {pair[0]} / {pair[1]} | {variant} | {result.disk_mean():.4f} "
                         f"| {float(result.xi.max()):.3f} | {_fmt(at_one)} "
                         f"| {result.seconds:.1f} s |")
        name = f"diag_xi_{_slug(paradigm)}_{_slug(pair[0])}__{_slug(pair[1])}.png"
        plot_disentanglement(maps, ctx.run_dir / name,
                             f"{paradigm}: weight-disentanglement error, {pair[0]} × {pair[1]}")
        files.append(name)
        out[ctx.pair_key(pair)] = {variant: m.to_dict() for variant, m in maps.items()}
    lines += ["", *[f"![ξ heatmap]({name})" for name in files]]
    return out, lines, files


def _value_at(alphas: Sequence[float], xi: torch.Tensor, a1: float, a2: float) -> float:
    try:
        return float(xi[list(alphas).index(a1), list(alphas).index(a2)])
    except ValueError:
        return float("nan")


@register_section("specialization")
def specialization_section(ctx: Context, paradigm: str) -> tuple[dict, list[str], list[str]]:
    """TFS overlap at θ0 (shared by all paradigms) and at each variant's θ0 + τ_t."""
    if not ctx.pairs:
        return {}, ["TFS compares two tasks; this run has one."], []
    opts = ctx.options
    tasks = list(dict.fromkeys(t for pair in ctx.pairs for t in pair))
    probes = [ctx.probes[t] for t in tasks]

    def score(vectors: dict[str, TaskVector] | None) -> SpecializationResult:
        return task_feature_specialization(ctx.resident, probes, vectors,
                                           share=opts.share, objective=opts.objective,
                                           max_examples=opts.tfs_examples)

    if "tfs_theta0" not in ctx.cache:
        ctx.log("  TFS at θ0")
        started = time.perf_counter()
        ctx.cache["tfs_theta0"] = (score(None), time.perf_counter() - started)
    results: dict[str, SpecializationResult] = {"θ0": ctx.cache["tfs_theta0"][0]}
    seconds = {"θ0": ctx.cache["tfs_theta0"][1]}
    note = ""
    if paradigm == "linear":
        note = ("Tangent vectors act on the linearised model, whose activations are those "
                "of θ0: TFS is shown at θ0 only.")
    else:
        for variant, by_task in ctx.vectors[paradigm].items():
            ctx.log(f"  TFS {paradigm}/{variant} at θ0 + τ_t")
            started = time.perf_counter()
            results[f"{variant} θ0+τ"] = score({t: by_task[t] for t in tasks})
            seconds[f"{variant} θ0+τ"] = time.perf_counter() - started
    name = f"diag_tfs_{_slug(paradigm)}.png"
    plot_specialization(results, ctx.run_dir / name,
                        f"{paradigm}: task-feature specialization (lower = more specialized)")
    lines = ["| pair | model | mean Jaccard(I_t, I_u) over layers | chance | wall time |",
             "|---|---|---|---|---|"]
    for pair in itertools.combinations(tasks, 2):
        for label, result in results.items():
            lines.append(f"| {pair[0]} / {pair[1]} | {label} | {result.mean_overlap(pair):.3f} "
                         f"| {result.mean_chance(pair):.3f} | {seconds[label]:.1f} s |")
    if note:
        lines += ["", note]
    lines += ["", f"![TFS overlap]({name})"]
    data = {label: {**r.to_dict(), "seconds": seconds[label]} for label, r in results.items()}
    return data, lines, [name]


def _strict(value: Any) -> Any:
    """NaN/inf → null, so diagnostics.json is strict JSON that any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


# ------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunDirectoryError(f"{path} not found: is {path.parent} a finished orthoreg run "
                                "(orthoreg demo --out DIR)?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path}: not valid JSON ({exc})") from None


def finetune_records(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(stage folder, record) of every finished fine-tuning stage that kept its vector."""
    out = []
    for result in sorted((run_dir / "stages").glob("finetune-*/result.json")):
        try:
            record = json.loads(result.read_text())
        except json.JSONDecodeError:
            continue
        if (result.parent / "vector.safetensors").is_file():
            out.append((result.parent, record))
    return out


def _close(a: Any, b: Any) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9,
                                                            abs_tol=1e-15)


def find_vector(records: Sequence[tuple[Path, dict[str, Any]]], run: dict[str, Any],
                task: str, config: Any) -> TaskVector:
    """The task vector of ``task`` for one results.json run (paradigm/variant/lr/λ/seed).

    If several stages match (the directory was reused with another config), the one whose
    vector records this config's model and step count is taken; still several is an error.
    """
    matches = [
        folder for folder, record in records
        if record.get("task") == task and record.get("paradigm") == run["paradigm"]
        and record.get("seed") == run["seed"]
        and record.get("candidate", {}).get("variant") == run["variant"]
        and _close(record.get("candidate", {}).get("lr"), run["lr"])
        and _close(record.get("candidate", {}).get("lam"), run["lambda"])
    ]
    if not matches:
        raise RunDirectoryError(
            f"no fine-tuning stage with a vector for task {task!r}, {run['paradigm']}/"
            f"{run['variant']} (lr={run['lr']:g}, λ={run['lambda']:g}, seed={run['seed']})")
    vectors = [TaskVector.load(folder / "vector.safetensors") for folder in matches]
    if len(vectors) > 1:
        fitting = [v for v in vectors if v.metadata.get("steps") == config.train.steps
                   and v.metadata.get("model") == config.model]
        if len(fitting) != 1:
            names = ", ".join(folder.name for folder in matches)
            raise RunDirectoryError(f"several stages match task {task!r}, {run['paradigm']}/"
                                    f"{run['variant']}: {names}; diagnose a fresh run directory")
        return fitting[0]
    return vectors[0]


def select_runs(results: dict[str, Any], options: DiagnoseOptions) -> tuple[
        int, dict[str, dict[str, dict[str, Any]]]]:
    """The seed and the runs (paradigm → variant → record) the options ask for."""
    runs = results.get("runs") or []
    if not runs:
        raise RunDirectoryError("results.json lists no runs")
    seeds = sorted({run["seed"] for run in runs})
    seed = seeds[0] if options.seed is None else options.seed
    if seed not in seeds:
        raise RunDirectoryError(f"seed {seed} is not in this run (seeds: {seeds})")
    available = list(dict.fromkeys(run["paradigm"] for run in runs))
    wanted = list(options.paradigms) if options.paradigms else available
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise RunDirectoryError(f"paradigm {unknown[0]!r} is not in this run "
                                f"(paradigms: {', '.join(available)})")
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for paradigm in wanted:
        chosen[paradigm] = {run["variant"]: run for run in runs
                            if run["paradigm"] == paradigm and run["seed"] == seed}
    return seed, chosen


def _check_options(options: DiagnoseOptions) -> None:
    unknown = [s for s in options.sections if s not in SECTIONS]
    if unknown:
        raise RunDirectoryError(f"unknown diagnostic {unknown[0]!r}; choose from "
                                f"{', '.join(SECTIONS)}")
    if options.split not in ("train", "val", "test"):
        raise RunDirectoryError(f"split must be train, val or test, got {options.split!r}")
    if options.examples < 1 or options.tfs_examples < 1:
        raise RunDirectoryError("--examples and --tfs-examples must be ≥ 1")
    if not 0 < options.share <= 1:
        raise RunDirectoryError(f"--share must be in (0, 1], got {options.share}")
    try:
        alpha_grid(options.points, options.extent)
    except ValueError as exc:
        raise RunDirectoryError(str(exc)) from None


# ------------------------------------------------------------------------- entry point
def diagnose_run(run_dir: str | Path, options: DiagnoseOptions | None = None,
                 log: Log = print) -> dict[str, Any]:
    """Compute every selected diagnostic for a finished run and write them next to its report.

    Returns the content of ``diagnostics.json``. The run directory is locked while the
    diagnosis reads heads and writes files, so it cannot race a ``demo`` in the same place.
    """
    from orthoreg.experiment.config import from_mapping
    from orthoreg.experiment.pipeline import Experiment

    options = options or DiagnoseOptions()
    _check_options(options)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    results = _read_json(run_dir / "results.json")
    stored = _read_json(run_dir / "config.json")
    config = from_mapping(stored.get("config", stored))
    seed, runs = select_runs(results, options)
    tasks = list(results.get("tasks") or config.tasks)
    pairs = list(itertools.combinations(tasks, 2))
    if not options.all_pairs:
        pairs = pairs[:1]
    needed = list(dict.fromkeys([t for pair in pairs for t in pair] or tasks[:1]))

    experiment = Experiment(config, run_dir, log=log, progress=False)
    with experiment.ws:
        load_started = time.perf_counter()
        experiment._load()  # the run's own backbone, data and frozen heads
        probes = {t: TaskProbe(t, experiment.tasks[t].head,
                               getattr(experiment.tasks[t], options.split)) for t in needed}
        records = finetune_records(run_dir)
        vectors = {paradigm: {variant: {t: find_vector(records, run, t, config) for t in needed}
                              for variant, run in by_variant.items()}
                   for paradigm, by_variant in runs.items()}
        load_seconds = time.perf_counter() - load_started
        ctx = Context(run_dir, results.get("name", run_dir.name),
                      ResidentModel(experiment.backbone), probes, pairs, runs, vectors,
                      options, log, cache={"squared": config.train.squared})
        sections: dict[str, dict[str, Any]] = {}
        markdown: dict[str, list[str]] = {}
        files: list[str] = []
        timings: dict[str, float] = {"load": load_seconds}
        for paradigm in runs:
            log(f"[diagnose {paradigm}]")
            sections[paradigm] = {}
            markdown[paradigm] = []
            for name in options.sections:
                section_started = time.perf_counter()
                data, lines, pngs = SECTIONS[name](ctx, paradigm)
                timings[f"{paradigm}/{name}"] = time.perf_counter() - section_started
                sections[paradigm][name] = data
                markdown[paradigm] += [f"#### {name.capitalize()}", "", *lines, ""]
                files += pngs
        timings["total"] = time.perf_counter() - started
        document = {
            "run": str(run_dir), "name": ctx.name, "seed": seed, "model": config.model,
            "pairs": [list(pair) for pair in pairs], "split": options.split,
            "options": asdict(options), "torch_threads": torch.get_num_threads(),
            "runs": {p: {v: {"lambda": r["lambda"], "lr": r["lr"]} for v, r in by.items()}
                     for p, by in runs.items()},
            "paradigms": sections, "files": files, "timings": timings,
        }
        atomic_write_json(run_dir / "diagnostics.json", _strict(to_jsonable(document)))
        body = render_markdown(document, markdown)
        atomic_write_text(run_dir / "diagnostics.md", "\n".join(["# Diagnostics", "", *body]) + "\n")
        append_report_section(run_dir, body)
    return document


INTRO = (
    "The paper's argument is a chain: task-feature specialization (TFS: tasks rely on "
    "different input features of a layer) → orthogonal task vectors → weight "
    "disentanglement (ξ ≈ 0: adding one task's vector does not change the other task's "
    "predictions; Ortiz-Jiménez et al. 2023) → good task arithmetic. Each link is shown "
    "for the baseline and the OrthoReg run selected by the experiment."
)


def render_markdown(document: dict[str, Any], markdown: dict[str, list[str]]) -> list[str]:
    """The diagnostics as markdown lines (headings from level 3, to nest in report.md)."""
    pairs = ", ".join(" × ".join(pair) for pair in document["pairs"]) or "none (one task)"
    opts = document["options"]
    timings = document["timings"]
    lines = [
        INTRO, "",
        f"Seed {document['seed']}; pairs: {pairs}; {opts['split']} split; ξ on a "
        f"{opts['points']}×{opts['points']} grid over [−{opts['extent']:g}, {opts['extent']:g}] "
        f"with ≤ {opts['examples']} examples per task; TFS with ≤ {opts['tfs_examples']} "
        f"examples per task, {opts['share']:.0%} of the attribution mass, objective "
        f"`{opts['objective']}`. Wall times with {document['torch_threads']} torch thread(s); "
        f"total {timings['total']:.1f} s (loading {timings['load']:.1f} s).",
        "",
    ]
    for paradigm, by_variant in document["runs"].items():
        chosen = ", ".join(f"{v} (λ={r['lambda']:g}, lr={r['lr']:.2g})"
                           for v, r in by_variant.items())
        lines += [f"### {paradigm}", "", f"Runs: {chosen}.", "", *markdown[paradigm]]
    return lines


def append_report_section(run_dir: Path, body: list[str]) -> Path | None:
    """Add (or replace) the "Diagnostics" section of ``report.md``; None if there is none."""
    path = run_dir / "report.md"
    if not path.is_file():
        return None
    text = path.read_text()
    section = "\n".join([BEGIN, "## Diagnostics", "", "Details: [diagnostics.md](diagnostics.md), "
                         "numbers: `diagnostics.json`.", "", *body, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    return atomic_write_text(path, text)
