"""``orthoreg clip reproduce``: the paper's CLIP table, end to end, in one resumable directory.

For each model (ViT-B/32; ViT-B/16 and ViT-L/14 on request), each paradigm (full, linear,
partial, LoRA) and each λ ∈ {0, the authors' λ} (:data:`orthoreg.clip.paper.PAPER_LAMBDAS`):
fine-tune the 8 tasks, then task addition over the 8 vectors and negation of each against
the control task — all through :mod:`orthoreg.clip.run` (``finetune_task``,
``evaluate_addition``, ``evaluate_negation``), nothing re-implemented. The paper's Table 1
numbers that can be cited (:mod:`orthoreg.clip.paper`) are printed beside ours; the rest
are marked absent.

Before any work it prints the GPU hours it expects — from step times *measured* on this
machine with a random-init model of each config (:mod:`orthoreg.clip.probe`) and the step
counts the recipe gives for the data on disk — and everything missing on disk (weights,
datasets) with how to obtain it; with something missing it stops there (``--plan-only``
always does).

Layout of ``--out``::

    runs/<model>/<paradigm>-lam<λ>/<Task>/     run directories (orthoreg.clip.run)
    results/<model>/<paradigm>-lam<λ>-{addition,negation}.json
    stages.json                                 wall time of every stage (appended)
    reproduce.json, table.md                    the plan, the estimate, the table

Rerunning resumes: finished fine-tunes return their records, an interrupted one continues
from its checkpoint, and an evaluation whose runs have not changed (their keys) is read
back instead of redone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orthoreg.clip.paper import (
    PAPER_LAMBDAS,
    TABLE1_SOURCE,
    published_addition,
)
from orthoreg.clip.recipe import PARADIGM_RECIPES, batch_preset, recipe_steps
from orthoreg.clip.templates import CONTROL_TASK, PAPER_TASKS
from orthoreg.errors import OrthoRegError
from orthoreg.utils.io import atomic_write_json, atomic_write_text

#: the steps per task the recipe's epochs are chosen to give (DESIGN.md §1: "~2000 steps
#: per task"), used for the estimate while a dataset is not on disk yet
ASSUMED_STEPS = 2000
#: threshold of the negation summary in the table (the protocol's first)
NEGATION_SUMMARY = 0.95


@dataclass(frozen=True)
class ModelPreset:
    """An open_clip config of OpenAI's CLIP weights, and the file the download script writes."""

    config: str
    weights_file: str


#: model key (the table's) → preset; OpenAI weights need QuickGELU (docs/CLIP.md §2)
MODEL_PRESETS: dict[str, ModelPreset] = {
    "ViT-B-32": ModelPreset("ViT-B-32-quickgelu", "ViT-B-32-openai.safetensors"),
    "ViT-B-16": ModelPreset("ViT-B-16-quickgelu", "ViT-B-16-openai.safetensors"),
    "ViT-L-14": ModelPreset("ViT-L-14-quickgelu", "ViT-L-14-openai.safetensors"),
}


@dataclass(frozen=True)
class ModelChoice:
    """One model of the plan: its table key, open_clip config, and weights file."""

    key: str
    config: str
    weights: str


def resolve_models(names: Sequence[str], weights_dir: str | Path,
                   weights: Mapping[str, str] | None = None) -> tuple[ModelChoice, ...]:
    """Preset keys (``ViT-B-32``…) or ``.json`` config paths (key: the file stem) → choices.

    Weights: ``weights[key]`` if given, else ``<weights_dir>/<preset file>`` (for a
    ``.json`` config, ``<weights_dir>/<stem>.safetensors``).
    """
    weights = dict(weights or {})
    out = []
    for name in names:
        if name.endswith(".json"):
            key, config = Path(name).stem, str(Path(name).resolve())
            default_file = f"{key}.safetensors"
        elif name in MODEL_PRESETS:
            key, config = name, MODEL_PRESETS[name].config
            default_file = MODEL_PRESETS[name].weights_file
        else:
            raise OrthoRegError(f"unknown model {name!r}; choose from {sorted(MODEL_PRESETS)} "
                                "or pass an open_clip .json config")
        path = weights.pop(key, None) or str(Path(weights_dir) / default_file)
        out.append(ModelChoice(key, config, str(Path(path).resolve())))
    if weights:
        raise OrthoRegError(f"--weights names model {next(iter(weights))!r}, which is not "
                            f"among --models ({', '.join(c.key for c in out)})")
    return tuple(out)


@dataclass(frozen=True)
class ReproducePlan:
    """Everything ``orthoreg clip reproduce`` will do; ``None`` fields take the recipe's."""

    out: str
    data_root: str
    models: tuple[ModelChoice, ...]
    tasks: tuple[str, ...] = PAPER_TASKS
    paradigms: tuple[str, ...] = tuple(PARADIGM_RECIPES)
    lambdas: Mapping[str, float] = field(
        default_factory=lambda: {p: v.value for p, v in PAPER_LAMBDAS.items()})
    control: str = CONTROL_TASK
    negation: bool = True
    merge: str = "task_arithmetic"
    alphas: tuple[float, ...] | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    seed: int = 0
    precision: str = "fp32"
    augment: str = "random-resized-crop"
    cache: str | None = None
    device: str | None = None
    workers: int | None = None
    eval_batch_size: int = 256
    progress: bool = True

    def lambda_values(self, paradigm: str) -> tuple[float, ...]:
        """The baseline λ = 0 and the paradigm's OrthoReg λ."""
        return (0.0, float(self.lambdas[paradigm]))

    def group_dir(self, model: ModelChoice, paradigm: str, lam: float) -> Path:
        return Path(self.out) / "runs" / model.key / f"{paradigm}-lam{lam:g}"

    def result_path(self, model: ModelChoice, paradigm: str, lam: float, kind: str) -> Path:
        return Path(self.out) / "results" / model.key / f"{paradigm}-lam{lam:g}-{kind}.json"

    def groups(self) -> list[tuple[ModelChoice, str, float]]:
        return [(model, paradigm, lam) for model in self.models for paradigm in self.paradigms
                for lam in self.lambda_values(paradigm)]

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["models"] = [asdict(model) for model in self.models]
        record["lambdas"] = dict(self.lambdas)
        return record


# ------------------------------------------------------------------------------- preflight
@dataclass(frozen=True)
class Missing:
    """An input that is not on disk, where it was looked for, and how to get it."""

    kind: str
    name: str
    path: str
    how: str

    def line(self) -> str:
        return f"{self.kind} {self.name}: {self.path} — {self.how}"


def missing_inputs(plan: ReproducePlan) -> list[Missing]:
    """Weights files and task folders (``<Task>/train`` and ``<Task>/test``) not on disk."""
    from orthoreg.clip.data import MissingDataError, task_dir

    missing = []
    for model in plan.models:
        if not Path(model.weights).is_file():
            how = (f"on a machine with internet: python scripts/clip_download_weights.py "
                   f"--model {model.key} --out {Path(model.weights).parent} (docs/CLIP.md §2)"
                   if model.key in MODEL_PRESETS else
                   f"a local open_clip checkpoint of {model.config}, passed as --weights "
                   f"{model.key}=PATH (docs/CLIP.md §2)")
            missing.append(Missing("weights", model.key, model.weights, how))
    tasks = [*plan.tasks, *([plan.control] if plan.negation else [])]
    for task in tasks:
        how = (f"python scripts/clip_download_datasets.py --tasks {task} --root "
               f"{plan.data_root} (docs/CLIP.md §3)")
        if task == CONTROL_TASK:
            how = (f"ImageNet needs a manual download (licence): docs/CLIP.md §3, then "
                   f"python scripts/clip_download_datasets.py --tasks ImageNet --root "
                   f"{plan.data_root} --imagenet-dir DIR")
        try:
            folder = task_dir(plan.data_root, task)
        except MissingDataError:
            missing.append(Missing("data", task, str(Path(plan.data_root) / task), how))
            continue
        for split in ("train", "test"):
            if not (folder / split).is_dir():
                missing.append(Missing("data", f"{task}/{split}", str(folder / split), how))
    return missing


def task_sizes(plan: ReproducePlan) -> dict[str, dict[str, int] | None]:
    """Images per split of each task on disk (the listing only, nothing decoded); None if absent."""
    from orthoreg.clip.data import MissingDataError, folder_splits

    sizes: dict[str, dict[str, int] | None] = {}
    for task in [*plan.tasks, *([plan.control] if plan.negation else [])]:
        try:
            splits = folder_splits(plan.data_root, task)
        except MissingDataError:
            sizes[task] = None
            continue
        sizes[task] = {split: len(files) for split, files in splits.items()}
    return sizes


@dataclass(frozen=True)
class Measurement:
    """Measured on this machine with a random-init model of the config (orthoreg.clip.probe)."""

    model: str
    device: str
    batch_size: int
    accumulation: int
    precision: str
    seconds_per_step: dict[str, float]  # paradigm → one optimizer step (all micro-batches)
    eval_images_per_second: float


def measure(plan: ReproducePlan, timed_steps: int = 5) -> dict[str, Measurement]:
    """Step time per model and paradigm at the plan's batch and precision, eval throughput."""
    from orthoreg.clip.probe import (
        WARMUP_STEPS,
        eval_images_per_second,
        random_parts,
        synthetic_eval_set,
        synthetic_train_set,
        time_training,
    )
    from orthoreg.clip.run import pick_device

    device = pick_device(plan.device)
    out = {}
    for model in plan.models:
        preset = batch_preset(model.config)
        batch = plan.batch_size or preset.batch_size
        accumulation = preset.accumulation if plan.batch_size is None else 1
        backbone, head = random_parts(model.config, classes=10, device=device)
        data = synthetic_train_set(batch * 2, backbone.image_size, 10, device=device)
        seconds = {}
        for paradigm in plan.paradigms:
            timing = time_training(backbone, head, data, paradigm, plan.lambdas[paradigm],
                                   plan.precision, WARMUP_STEPS + timed_steps, batch, device,
                                   model=model.config)
            seconds[paradigm] = timing.seconds_per_step * accumulation
        evaluation = synthetic_eval_set(max(plan.eval_batch_size, 16), backbone.image_size, 10)
        rate = eval_images_per_second(backbone, head, evaluation, device, plan.eval_batch_size)
        out[model.key] = Measurement(model.key, str(device), batch, accumulation,
                                     plan.precision, seconds, rate)
        del backbone, head
    return out


#: forward passes per evaluated image, by how a paradigm's grid is evaluated: weight space
#: (one per grid point) or tangent space (one JVP ≈ 3 forwards for the whole grid, per
#: vector: evaluation/grid.py)
_TANGENT_FORWARDS = 3.0


def estimate(plan: ReproducePlan, measurements: Mapping[str, Measurement],
             sizes: Mapping[str, Mapping[str, int] | None]) -> dict[str, Any]:
    """GPU hours of the plan: training from measured step times × recipe steps, evaluation
    from measured throughput × images evaluated (None while some data is not on disk)."""
    from orthoreg.merging import default_alphas

    grid = len(plan.alphas) if plan.alphas else len(default_alphas(plan.merge))
    negation_grid = len(plan.alphas) if plan.alphas else 21
    assumed = sorted(task for task in plan.tasks if sizes.get(task) is None)
    train_seconds = 0.0
    eval_images = 0.0
    eval_known = not assumed and (not plan.negation or sizes.get(plan.control) is not None)
    for model, paradigm, _lam in plan.groups():
        measured = measurements[model.key]
        per_step = measured.seconds_per_step[paradigm]
        tangent = _TANGENT_FORWARDS if paradigm == "linear" else 1.0
        for task in plan.tasks:
            split = sizes.get(task)
            if plan.steps is not None:
                steps = plan.steps
            elif split is None:
                steps = ASSUMED_STEPS
            else:
                preset = batch_preset(model.config)
                batch = replace(preset, batch_size=measured.batch_size,
                                accumulation=measured.accumulation)
                steps = recipe_steps(task, split["train"], batch, plan.epochs)
            train_seconds += steps * per_step
            if eval_known:
                assert split is not None
                eval_images += 2 * (split["val"] + split["test"])  # zero-shot and fine-tuned
                eval_images += tangent * (grid * split["val"]) + split["test"]  # addition
                if plan.negation:
                    control = sizes[plan.control]
                    assert control is not None
                    eval_images += tangent * negation_grid * (split["val"] + control["val"])
                    eval_images += 2 * (split["test"] + control["test"])
    eval_seconds = None
    if eval_known:
        rates = [m.eval_images_per_second for m in measurements.values()]
        eval_seconds = eval_images / (sum(rates) / len(rates))
    hours = train_seconds / 3600 + (eval_seconds or 0.0) / 3600
    return {
        "train_gpu_hours": train_seconds / 3600,
        "eval_gpu_hours": None if eval_seconds is None else eval_seconds / 3600,
        "total_gpu_hours": hours,
        "steps_source": ("--steps" if plan.steps is not None else
                         f"assumed {ASSUMED_STEPS} per task for {', '.join(assumed)} (not on "
                         "disk; DESIGN.md: ~2000 steps per task)" if assumed else
                         "the recipe's epochs over the data on disk"),
        "eval_note": (None if eval_known else "evaluation not estimated: some data is not "
                      "on disk yet"),
    }


# ------------------------------------------------------------------------------- stages
class StageLog:
    """Wall time of every stage, appended to ``stages.json`` as it finishes (atomic writes)."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo
        self.entries: list[dict[str, Any]] = (json.loads(path.read_text())
                                               if path.is_file() else [])

    def record(self, stage: str, seconds: float, cached: bool, **labels: Any) -> None:
        entry = {"stage": stage, **labels, "seconds": round(seconds, 3), "cached": cached,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.entries.append(entry)
        atomic_write_json(self.path, self.entries)
        what = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in labels.values())
        self.echo(f"  {stage:9s} {what}: {'cached' if cached else f'{seconds:.1f} s'}")


def _run_keys(run_dirs: Sequence[Path]) -> dict[str, str]:
    keys = {}
    for folder in run_dirs:
        record = json.loads((folder / "run.json").read_text())
        keys[str(record["task"])] = str(record["key"])
    return keys


def _cached_result(path: Path, run_keys: Mapping[str, str]) -> dict[str, Any] | None:
    """A stored evaluation, if it was computed from exactly these runs."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("run_keys") == dict(run_keys) else None


def run_plan(plan: ReproducePlan, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of the plan, resumably; returns the summary written to reproduce.json."""
    from orthoreg.clip.run import (
        EvalOptions,
        FinetuneSpec,
        evaluate_addition,
        evaluate_negation,
        finetune_task,
    )

    out = Path(plan.out)
    stages = StageLog(out / "stages.json", echo)
    options = EvalOptions(data_root=plan.data_root, cache=plan.cache, device=plan.device,
                          batch_size=plan.eval_batch_size, workers=plan.workers,
                          progress=plan.progress)
    results: dict[str, Any] = {}
    for model, paradigm, lam in plan.groups():
        labels = {"model": model.key, "paradigm": paradigm, "lambda": lam}
        run_dirs = []
        for task in plan.tasks:
            folder = plan.group_dir(model, paradigm, lam) / task
            spec = FinetuneSpec(
                model=model.config, weights=model.weights, data_root=plan.data_root,
                task=task, out=str(folder), paradigm=paradigm, lam=lam, seed=plan.seed,
                epochs=plan.epochs, steps=plan.steps, batch_size=plan.batch_size,
                lr=plan.lr, warmup_steps=plan.warmup_steps, cache=plan.cache, device=plan.device, precision=plan.precision,
                augment=plan.augment, eval_batch_size=plan.eval_batch_size,
                workers=plan.workers, progress=plan.progress)
            cached = (folder / "run.json").is_file() and (folder / "vector.safetensors").is_file()
            started = time.perf_counter()
            record = finetune_task(spec)
            assert record is not None  # a single process is rank 0
            seconds = float(record.get("seconds", 0.0)) if cached else (
                time.perf_counter() - started)
            stages.record("finetune", seconds, cached, **labels, task=task)
            run_dirs.append(folder)
        keys = _run_keys(run_dirs)
        group: dict[str, Any] = {}
        for kind in ("addition", "negation") if plan.negation else ("addition",):
            path = plan.result_path(model, paradigm, lam, kind)
            result = _cached_result(path, keys)
            started = time.perf_counter()
            if result is None:
                computed = (evaluate_addition(run_dirs, options, alphas=plan.alphas,
                                              merge=plan.merge) if kind == "addition" else
                            evaluate_negation(run_dirs, options, control=plan.control,
                                              alphas=plan.alphas))
                result = {**computed, "run_keys": keys}
                result["seconds"] = time.perf_counter() - started
                atomic_write_json(path, result)
                stages.record(kind, result["seconds"], False, **labels)
            else:
                stages.record(kind, float(result.get("seconds", 0.0)), True, **labels)
            group[kind] = result
        results[f"{model.key}/{paradigm}/{lam:g}"] = summarize(model.key, paradigm, lam, group)
    return results


# ------------------------------------------------------------------------------- the table
def summarize(model: str, paradigm: str, lam: float,
              group: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One row of the table: ours (percent) beside the paper's, which may be absent."""
    addition = group["addition"]
    row: dict[str, Any] = {
        "model": model, "paradigm": paradigm, "lambda": lam, "merge": addition["merge"],
        "alpha": addition["alpha"],
        "ours_absolute": 100 * addition["test_abs"], "ours_normalized": 100 * addition["test_norm"],
    }
    published = published_addition(model, paradigm, orthoreg=lam > 0)
    row["paper_absolute"] = published.absolute if published else None
    row["paper_normalized"] = published.normalized if published else None
    negation = group.get("negation")
    if negation is not None:
        chosen = [next(c for c in r["thresholds"] if math.isclose(c["threshold"],
                                                                  NEGATION_SUMMARY))
                  for r in negation["results"].values()]
        row["ours_negation_target"] = 100 * sum(c["test_target"] for c in chosen) / len(chosen)
        row["ours_negation_control"] = 100 * sum(c["test_control"] for c in chosen) / len(chosen)
    return row


def _cell(value: float | None) -> str:
    return "absent" if value is None else f"{value:.2f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: the paper's Table 1 (task addition, %) beside ours, and our negation."""
    lines = [
        "| model | paradigm | λ | paper abs | ours abs | paper norm | ours norm | α | "
        f"negation target / control (ours, q={NEGATION_SUMMARY:g}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lam = row["lambda"]
        known = PAPER_LAMBDAS.get(row["paradigm"])
        assumed = lam > 0 and known is not None and not known.cited and lam == known.value
        lam_text = f"{lam:g}" + (" (assumed)" if assumed else "")
        negation = ("—" if "ours_negation_target" not in row else
                    f"{row['ours_negation_target']:.2f} / {row['ours_negation_control']:.2f}")
        lines.append(
            f"| {row['model']} | {row['paradigm']} | {lam_text} | "
            f"{_cell(row['paper_absolute'])} | {row['ours_absolute']:.2f} | "
            f"{_cell(row['paper_normalized'])} | {row['ours_normalized']:.2f} | "
            f"{row['alpha']:g} | {negation} |")
    lines += ["", f"Paper values: {TABLE1_SOURCE}; 'absent' = no value this project can cite "
              "(the paper's negation numbers are absent throughout)."]
    return "\n".join(lines)


def stage_summary(entries: Sequence[Mapping[str, Any]]) -> str:
    """Wall time per stage kind (this and earlier invocations), from stages.json."""
    totals: dict[str, list[float]] = {}
    for entry in entries:
        if not entry.get("cached"):
            totals.setdefault(str(entry["stage"]), []).append(float(entry["seconds"]))
    parts = [f"{stage} {len(times)}× {sum(times) / 3600:.2f} h" if sum(times) > 3600 else
             f"{stage} {len(times)}× {sum(times):.1f} s" for stage, times in totals.items()]
    return "wall time per stage: " + (", ".join(parts) or "nothing computed")


# ------------------------------------------------------------------------------- entry point
def reproduce(plan: ReproducePlan, measure_steps: int = 5, plan_only: bool = False,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Preflight (estimate, missing inputs), then :func:`run_plan`, then the table."""
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = len(plan.groups()) * len(plan.tasks)
    echo(f"orthoreg clip reproduce → {out}: {len(plan.models)} model(s) × "
         f"{len(plan.paradigms)} paradigm(s) × 2 λ × {len(plan.tasks)} tasks = {runs} "
         f"fine-tuning runs, {len(plan.groups())} additions"
         + (f", {len(plan.groups())} negations (control {plan.control})" if plan.negation
            else ""))
    for paradigm in plan.paradigms:
        cited = PAPER_LAMBDAS.get(paradigm)
        note = "" if cited is None else f" ({cited.note})"
        lam = plan.lambdas[paradigm]
        if cited is not None and lam != cited.value:
            note = " (--lam)"
        echo(f"  λ {paradigm}: {lam:g}{note}")
    summary: dict[str, Any] = {"kind": "orthoreg.clip_reproduce", "plan": plan.to_dict()}
    sizes = task_sizes(plan)
    if measure_steps > 0:
        started = time.perf_counter()
        measurements = measure(plan, measure_steps)
        for m in measurements.values():
            steps = ", ".join(f"{p} {s:.3g} s" for p, s in m.seconds_per_step.items())
            echo(f"measured on {m.device} ({_device_name(m.device)}), {m.precision}, batch "
                 f"{m.batch_size}×{m.accumulation}, random-init {m.model}: {steps} per step; "
                 f"evaluation {m.eval_images_per_second:.0f} images/s")
        guess = estimate(plan, measurements, sizes)
        guess["measure_seconds"] = time.perf_counter() - started
        evaluation = ("" if guess["eval_gpu_hours"] is None
                      else f" + evaluation {guess['eval_gpu_hours']:.3g}")
        echo(f"estimated GPU hours: training {guess['train_gpu_hours']:.3g}{evaluation} = "
             f"{guess['total_gpu_hours']:.3g} (steps: {guess['steps_source']})"
             + (f"; {guess['eval_note']}" if guess["eval_note"] else ""))
        summary["measurements"] = {k: asdict(v) for k, v in measurements.items()}
        summary["estimate"] = guess
    missing = missing_inputs(plan)
    summary["missing"] = [asdict(m) for m in missing]
    if missing:
        echo(f"missing on disk ({len(missing)}):")
        for item in missing:
            echo(f"  {item.line()}")
    else:
        echo("nothing missing on disk")
    if plan_only or missing:
        atomic_write_json(out / "plan.json", summary)
        if missing and not plan_only:
            raise OrthoRegError(f"{len(missing)} input(s) missing on disk (listed above); "
                                "nothing was run")
        return summary
    rows = run_plan(plan, echo)
    table = format_table(list(rows.values()))
    stages = json.loads((out / "stages.json").read_text())
    summary.update({"results": rows, "table": table, "stages": stage_summary(stages)})
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_json(out / "reproduce.json", summary)
    echo("")
    echo(table)
    echo(summary["stages"])
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


__all__ = ["MODEL_PRESETS", "Measurement", "Missing", "ModelChoice", "ReproducePlan",
           "estimate", "format_table", "measure", "missing_inputs", "reproduce",
           "resolve_models", "run_plan", "summarize", "task_sizes"]
