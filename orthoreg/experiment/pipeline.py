"""config → fine-tune → task vectors → select → add / negate → results.

Every expensive piece is a cached stage in a :class:`Workspace`, so rerunning the same
config skips finished fine-tunes and an interrupted run resumes where it stopped.

Fair comparison (issue: "Honesty and a fair control"): OrthoReg's penalty also grows ΔW,
so part of a gain may be "more fine-tuning". The baseline therefore gets an equal tuning
budget — a learning-rate grid as large as OrthoReg's λ grid — and both pick on the
validation splits by mean absolute task-addition accuracy. The report shows task-vector
norms next to cosines so that "more orthogonal" can be told from "just bigger".
"""

from __future__ import annotations

import copy
import itertools
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.errors import ConfigError
from orthoreg.experiment.config import ExperimentConfig, ParadigmConfig
from orthoreg.experiment.progress import StageClock
from orthoreg.experiment.workspace import Workspace, stage_key
from orthoreg.paradigms import Paradigm, get_paradigm
from orthoreg.taskvector import TaskVector
from orthoreg.training import TrainConfig, finetune
from orthoreg.utils.io import atomic_write_bytes, atomic_write_json
from orthoreg.utils.provenance import provenance, seed_everything

Log = Callable[[str], None]

#: how each paradigm is built from its config section (defaults for CNN backbones)
PARADIGM_BUILDERS: dict[str, Callable[[ParadigmConfig], Paradigm]] = {
    "full": lambda c: get_paradigm("full"),
    "linear": lambda c: get_paradigm("linear", select=c.select),
    "partial": lambda c: get_paradigm("partial", select=c.select or "pointwise"),
    "lora": lambda c: get_paradigm("lora", targets=c.targets or "pointwise", rank=c.rank,
                                   alpha=c.alpha),
}


@dataclass
class Task:
    """One task's data on the backbone's input scale, and its frozen head."""

    name: str
    head: nn.Module
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: int
    splits: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One point of a variant's tuning grid: "baseline" (λ = 0), "orthoreg" (the penalty
    form of ``train.form``, the paper's by default) or another form (``selection.forms``)."""

    variant: str
    lr: float
    lam: float
    form: str = "paper"

    @property
    def label(self) -> str:
        return f"{self.variant}(lr={self.lr:g}, λ={self.lam:g})"

    def to_dict(self) -> dict[str, Any]:
        """The record of the candidate; the paper form is implied, so that the stage keys
        of runs made before penalty forms existed stay valid."""
        record = asdict(self)
        if self.form == "paper":
            del record["form"]
        return record


def candidates(config: ExperimentConfig, paradigm: str) -> list[Candidate]:
    base_lr = config.paradigms[paradigm].lr
    baseline = [Candidate("baseline", base_lr * m, 0.0) for m in config.selection.lr_multipliers]
    ortho = [Candidate("orthoreg", base_lr, lam, config.train.form)
             for lam in config.selection.lambdas]
    forms = [Candidate(form, base_lr, lam, form)
             for form, grid in config.selection.forms.items() for lam in grid]
    return baseline + ortho + forms


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-30)


def pin_selection(config: ExperimentConfig,
                  source: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """A finished run's choices as this run's: per paradigm and variant, the candidate of
    ``config``'s own grid that the source chose (so the protocol is the one the grid
    defines; only *which* point was chosen comes from the source, on its selecting seed).
    Raises ConfigError naming the paradigm and variant that the source lacks or that is not
    on this config's grid."""
    if config.selection.on_seed == "each":
        raise ConfigError("config key 'selection.on_seed': 'each' chooses on every seed; "
                          "a pinned selection needs 'first'")
    selection = source.get("selection")
    if not isinstance(selection, Mapping):
        raise ConfigError("the pinned results have no 'selection' (not an orthoreg results.json)")
    origin = {"git_commit": source.get("git_commit"),
              "seeds": sorted({r.get("seed") for r in source.get("runs", [])}),
              "name": source.get("name")}
    pinned: dict[str, dict[str, dict[str, Any]]] = {}
    for paradigm in config.paradigms:
        grid = candidates(config, paradigm)
        chosen_there = selection.get(paradigm)
        if not isinstance(chosen_there, Mapping):
            raise ConfigError(f"the pinned results chose nothing for paradigm {paradigm!r}")
        pinned[paradigm] = {}
        for variant in dict.fromkeys(c.variant for c in grid):
            choice = chosen_there.get(variant)
            if not isinstance(choice, Mapping):
                raise ConfigError(f"the pinned results chose nothing for {paradigm} / {variant}")
            match = [c for c in grid if c.variant == variant and _same(c.lr, choice["lr"])
                     and _same(c.lam, choice["lambda"])
                     and c.form == choice.get("form", "paper")]
            if not match:
                raise ConfigError(
                    f"the pinned choice for {paradigm} / {variant} (lr={choice['lr']:g}, "
                    f"λ={choice['lambda']:g}) is not on this config's grid; pin a run of "
                    "the same config")
            pinned[paradigm][variant] = {"candidate": match[0], "grid": choice.get("grid", []),
                                         "pinned_from": origin}
    return pinned


class Experiment:
    """Runs one config in one output directory (see module docstring)."""

    def __init__(self, config: ExperimentConfig, out: str | Path, log: Log = print,
                 progress: bool = True, pinned: Mapping[str, Any] | None = None) -> None:
        """``pinned``: a finished run's ``results.json`` (its ``selection`` and provenance) —
        reuse the candidates it chose instead of searching, so further seeds of the same
        benchmark can run on another machine or day and be joined with ``orthoreg
        combine``. Every pinned choice must be a point of this config's own grids."""
        self.config = config
        self.pinned = pin_selection(config, pinned) if pinned is not None else None
        self.ws = Workspace(out)
        self.log = log
        self.progress = progress
        self.device = torch.device(config.device)
        self.timings: dict[str, float] = {}
        self.clock = StageClock(log)
        #: (paradigm, candidate, seed, task) -> the stage file of that task vector
        self.vector_paths: dict[tuple[str, Candidate, int, str], Path] = {}

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        from orthoreg.zoo.registry import family_of

        cfg = self.config
        started = time.perf_counter()
        self.family = family_of(cfg.model)
        self.backbone = self.family.get_model(cfg.model).to(self.device).eval()
        self.backbone.requires_grad_(False)
        self.tasks: dict[str, Task] = {}
        names = list(cfg.tasks)
        self.control_name = cfg.control or self.family.control
        if self.control_name in names:
            raise ConfigError(f"config key 'control': the control task {self.control_name!r} "
                              "is also a fine-tuning task; name another one")
        self._check_paradigms()
        for name in [*names, self.control_name]:
            self.tasks[name] = self._load_task(name)
        self.timings["load"] = time.perf_counter() - started

    def _check_paradigms(self) -> None:
        """Build each paradigm once on a copy of the backbone, before any head or step, so
        that options matching nothing in this model fail now rather than mid-run."""
        for name, options in self.config.paradigms.items():
            try:
                PARADIGM_BUILDERS[name](options).prepare(copy.deepcopy(self.backbone))
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"config key 'paradigms.{name}': {exc}") from None

    def _load_task(self, name: str) -> Task:
        data = self.config.data
        prepared = self.family.prepare(self.backbone, name, data)
        head_key = stage_key("head", self.family.head_spec(self.config.model, prepared, data))
        head_path = self.ws.stage_dir(head_key) / "head.safetensors"
        if self.ws.done(head_key):
            head = self.family.load_head(head_path)
        else:
            try:
                head = self.family.build_head(self.backbone, prepared, data)
            except ValueError as exc:  # e.g. fewer training examples of a class than shots
                raise ConfigError(f"config key 'data.shots': task {name!r}: {exc}") from None
            self.family.save_head(head, head_path, {"task": name, "model": self.config.model})
            self.ws.finish(head_key, {"task": name})
        head = head.to(self.device).eval().requires_grad_(False)
        return Task(name, head, prepared.train, prepared.val, prepared.test,
                    len(prepared.classes), dict(prepared.splits), dict(prepared.info))

    # ------------------------------------------------------------------ stages
    def _train_config(self, candidate: Candidate, seed: int) -> TrainConfig:
        t = self.config.train
        return TrainConfig(steps=t.steps, batch_size=t.batch_size, lr=candidate.lr,
                           weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                           grad_clip=t.grad_clip, accumulation=t.accumulation,
                           label_smoothing=t.label_smoothing, lam=candidate.lam,
                           squared=t.squared, estimator=t.estimator, probes=t.probes,
                           form=candidate.form, matrices=t.matrices,
                           seed=seed, checkpoint_every=max(10, t.steps // 4),
                           log_every=max(1, t.steps // 10), progress=self.progress)

    def _finetune_key(self, paradigm: str, candidate: Candidate, seed: int, task: str) -> str:
        train_cfg = self._train_config(candidate, seed)
        return stage_key("finetune", {
            "model": self.config.model, "task": task, "paradigm": paradigm,
            "paradigm_options": asdict(self.config.paradigms[paradigm]),
            "train": train_cfg.resume_key(), "data": asdict(self.config.data),
            "splits": self.tasks[task].splits})

    def finetune(self, paradigm: str, candidate: Candidate, seed: int,
                 task: str) -> tuple[TaskVector, dict[str, Any]]:
        """One cached fine-tuning stage → (task vector, record with accuracies)."""
        from orthoreg.evaluation import accuracy

        pcfg = self.config.paradigms[paradigm]
        train_cfg = self._train_config(candidate, seed)
        key = self._finetune_key(paradigm, candidate, seed, task)
        folder = self.ws.stage_dir(key)
        vector_path = folder / "vector.safetensors"
        self.vector_paths[(paradigm, candidate, seed, task)] = vector_path
        record = self.ws.done(key)
        if record is not None and vector_path.is_file():
            return TaskVector.load(vector_path, device=self.device), record
        self.clock.start(f"fine-tune {paradigm:7s} {candidate.label:32s} seed={seed} task={task}")
        seed_everything(seed)
        model = PARADIGM_BUILDERS[paradigm](pcfg).prepare(copy.deepcopy(self.backbone))
        model.to(self.device)
        data = self.tasks[task]
        result = finetune(model, data.head, data.train, train_cfg, workdir=folder)
        model.eval()
        vector = model.task_vector({
            "task": task, "lambda": candidate.lam, "lr": candidate.lr, "seed": seed,
            "form": candidate.form,
            "squared": train_cfg.squared, "steps": train_cfg.steps, "model": self.config.model,
            **provenance(seed),
        })
        vector.save(vector_path)
        record = {
            "task": task, "paradigm": paradigm, "candidate": candidate.to_dict(), "seed": seed,
            "val_acc": accuracy(model, data.head, data.val),
            "test_acc": accuracy(model, data.head, data.test),
            "train_seconds": result.seconds, "final": result.final,
            "penalty_final": result.final.get("penalty"),
            "regime": regime_series(result.regime),
        }
        (folder / "checkpoint.safetensors").unlink(missing_ok=True)  # the vector supersedes it
        self.clock.finish()
        return vector, self.ws.finish(key, record)

    def vectors(self, paradigm: str, candidate: Candidate,
                seed: int) -> tuple[dict[str, TaskVector], dict[str, dict[str, Any]]]:
        vectors, records = {}, {}
        for task in self.config.tasks:
            vectors[task], records[task] = self.finetune(paradigm, candidate, seed, task)
        return vectors, records

    def _spec(self, paradigm: str) -> list[Any]:
        return [self.config.model, asdict(self.config.data), asdict(self.config.train),
                asdict(self.config.paradigms[paradigm])]

    def _cached_search(self, key: str, label: str, compute: Callable[[], Any]) -> dict[str, Any]:
        """A cached search stage, announced with its duration (searches have no step bar)."""
        cached = self.ws.done(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        self.log(f"  {label} …")
        result = compute()
        self.log(f"  {label}: {time.perf_counter() - started:.1f} s")
        return self.ws.finish(key, result)

    def addition(self, paradigm: str, candidate: Candidate, seed: int,
                 merge: str | None = None, scale_to: dict[str, float] | None = None
                 ) -> dict[str, Any]:
        """Task addition of the candidate's vectors (α on validation, DESIGN.md §2).

        ``merge`` other than the configured one is searched on that method's reference
        α grid; ``scale_to`` rescales each task's vector to the given norm first (the
        norm-matched comparison).
        """
        from orthoreg.evaluation import TaskEval, addition

        vectors, records = self.vectors(paradigm, candidate, seed)
        merge = merge or self.config.merge
        alphas = (self.config.alphas.values() if merge == self.config.merge
                  else merge_alphas(merge, self.config.alphas.values()))
        spec: dict[str, Any] = {
            "vectors": {t: records[t]["candidate"] | {"seed": seed, "paradigm": paradigm,
                                                      "acc": records[t]["val_acc"]}
                        for t in vectors},
            "alphas": alphas, "merge": merge, "spec": self._spec(paradigm),
        }
        if scale_to is not None:
            spec["scale_to"] = scale_to
            vectors = rescaled(vectors, scale_to)
        evals = {t: TaskEval(t, self.tasks[t].head, self.tasks[t].val, self.tasks[t].test)
                 for t in vectors}
        finetuned = {t: {"val": r["val_acc"], "test": r["test_acc"]} for t, r in records.items()}
        what = "norm-matched " if scale_to is not None else ""
        return self._cached_search(
            stage_key("addition", spec),
            f"{what}addition ({merge}) {paradigm} {candidate.label} seed={seed}",
            lambda: addition(self.backbone, evals, vectors, finetuned, alphas=alphas,
                             merge=merge).to_dict())

    def negation(self, paradigm: str, candidate: Candidate, seed: int) -> dict[str, Any]:
        from orthoreg.evaluation import TaskEval, negation

        vectors, records = self.vectors(paradigm, candidate, seed)
        control = self.tasks[self.control_name]
        control_eval = TaskEval(control.name, control.head, control.val, control.test)
        out = {}
        for task, vector in vectors.items():
            key = stage_key("negation", {
                "vector": records[task]["candidate"] | {"seed": seed, "paradigm": paradigm,
                                                        "task": task,
                                                        "acc": records[task]["val_acc"]},
                "control": self.control_name, "alphas": self.config.alphas.values(),
                "thresholds": self.config.negation_thresholds,
                "spec": self._spec(paradigm),
            })
            t = self.tasks[task]
            out[task] = self._cached_search(
                key, f"negation {paradigm} {candidate.label} seed={seed} task={task}",
                lambda t=t, task=task, vector=vector: negation(
                    self.backbone, TaskEval(task, t.head, t.val, t.test), control_eval, vector,
                    alphas=self.config.alphas.values(),
                    thresholds=self.config.negation_thresholds).to_dict())
        return out

    def disentanglement(self, paradigm: str, candidate: Candidate, seed: int,
                        scale_to: dict[str, float] | None = None) -> dict[str, Any]:
        """ξ of every pair of the candidate's task vectors (mean over the unit disk)."""
        from orthoreg.diagnostics import TaskProbe, alpha_grid, disentanglement_error

        mech = self.config.mechanism
        vectors, records = self.vectors(paradigm, candidate, seed)
        if scale_to is not None:
            vectors = rescaled(vectors, scale_to)
        grid = alpha_grid(mech.xi_points, mech.xi_extent)
        spec = {"vectors": {t: records[t]["candidate"] | {"seed": seed, "paradigm": paradigm,
                                                          "acc": records[t]["val_acc"]}
                            for t in vectors},
                "grid": grid, "examples": mech.xi_examples, "scale_to": scale_to,
                "spec": self._spec(paradigm)}

        def compute() -> dict[str, Any]:
            pairs = {}
            for a, b in itertools.combinations(list(vectors), 2):
                probes = [TaskProbe(t, self.tasks[t].head, self.tasks[t].val) for t in (a, b)]
                xi_map = disentanglement_error(self.backbone, probes, [vectors[a], vectors[b]],
                                               alphas=grid, max_examples=mech.xi_examples,
                                               seed=seed)
                pairs[f"{a}+{b}"] = xi_map.disk_mean()
            return {"pairs": pairs, "mean": _mean(pairs.values()), "grid": grid,
                    "examples": mech.xi_examples, "split": "val"}

        what = "norm-matched " if scale_to is not None else ""
        return self._cached_search(stage_key("xi", spec),
                                   f"{what}ξ {paradigm} {candidate.label} seed={seed}", compute)

    # ------------------------------------------------------------------ selection
    def select(self, paradigm: str, seed: int) -> dict[str, dict[str, Any]]:
        """Per variant, the candidate with the best mean val accuracy of task addition."""
        scores: dict[str, list[tuple[float, Candidate]]] = {}
        for candidate in candidates(self.config, paradigm):
            result = self.addition(paradigm, candidate, seed)
            scores.setdefault(candidate.variant, []).append((result["val_abs"], candidate))
        chosen = {}
        for variant, scored in scores.items():
            best = max(scored, key=lambda pair: pair[0])[1]
            chosen[variant] = {"candidate": best,
                               "grid": [{"lr": c.lr, "lambda": c.lam, "val_abs": s}
                                        for s, c in scored]}
        return chosen

    # ------------------------------------------------------------------ run
    def pretrained(self) -> dict[str, dict[str, float]]:
        from orthoreg.evaluation import accuracy

        return {name: {"val": accuracy(self.backbone, t.head, t.val),
                       "test": accuracy(self.backbone, t.head, t.test)}
                for name, t in self.tasks.items()}

    def planned_finetunes(self) -> list[tuple[str, Candidate, int, str]]:
        """Every fine-tune the run can need: all candidates on the selecting seed(s), and
        as many per further seed as there are variants (an upper bound for the estimate)."""
        seeds = list(self.config.seeds)
        each = self.config.selection.on_seed == "each"
        plan = []
        for paradigm in self.config.paradigms:
            grid = candidates(self.config, paradigm)
            variants = list(dict.fromkeys(c.variant for c in grid))
            for seed in seeds:
                if self.pinned is not None:
                    chosen = [c["candidate"] for c in self.pinned[paradigm].values()]
                else:
                    chosen = grid if each or seed == seeds[0] else [
                        next(c for c in grid if c.variant == v) for v in variants]
                plan += [(paradigm, c, seed, t) for c in chosen for t in self.config.tasks]
        return plan

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        with self.ws:
            atomic_write_json(self.ws.root / "config.json",
                              {"config": self.config.to_dict(), **provenance()})
            self._load()
            plan = self.planned_finetunes()
            cached = sum(self.ws.done(self._finetune_key(*p)) is not None for p in plan)
            self.clock.plan(len(plan), cached)
            pre = self.pretrained()
            runs, selections = [], {}
            seeds = list(self.config.seeds)
            for paradigm in self.config.paradigms:
                self.log(f"[{paradigm}]")
                chosen = (self.pinned[paradigm] if self.pinned is not None
                          else self.select(paradigm, seeds[0]))
                selections[paradigm] = {v: {"lr": c["candidate"].lr, "lambda": c["candidate"].lam,
                                            "form": c["candidate"].form, "grid": c["grid"],
                                            **({"pinned_from": c["pinned_from"]}
                                               if "pinned_from" in c else {})}
                                        for v, c in chosen.items()}
                for seed in seeds:
                    if self.config.selection.on_seed == "each" and seed != seeds[0]:
                        chosen = self.select(paradigm, seed)
                    reference = self._reference_norms(paradigm, chosen, seed)
                    for variant, choice in chosen.items():
                        runs.append(self._run_record(paradigm, variant, choice["candidate"],
                                                     seed, pre, reference))
            links = link_vectors(self.ws.root, runs, seeds[0])
            results = {
                "name": self.config.name, "model": self.config.model,
                "family": self.family.name,
                "tasks": list(self.config.tasks), "control": self.control_name,
                "pretrained": pre, "data_info": self.data_info(),
                "selection": selections, "runs": runs,
                "summary": summarize(runs), "vectors_index": links,
                "timings": {**self.timings, "total": time.perf_counter() - started},
                "config": self.config.to_dict(), **provenance(),
            }
            atomic_write_json(self.ws.root / "results.json", results)
            from orthoreg.experiment.report import write_report

            write_report(self.ws.root, results)
        return results

    def data_info(self) -> dict[str, Any]:
        """What the family reported about each task's data (e.g. truncated texts)."""
        return {name: task.info for name, task in self.tasks.items() if task.info}

    def _reference_norms(self, paradigm: str, chosen: dict[str, dict[str, Any]],
                         seed: int) -> dict[str, float] | None:
        """Per task, ‖τ‖ of the baseline's chosen vector: the norm every variant is rescaled
        to in the norm-matched comparison (None when that comparison is off)."""
        if not self.config.mechanism.norm_matched or "baseline" not in chosen:
            return None
        vectors, _ = self.vectors(paradigm, chosen["baseline"]["candidate"], seed)
        return {t: vectors[t].norm() for t in vectors}

    def _run_record(self, paradigm: str, variant: str, candidate: Candidate, seed: int,
                    pre: dict[str, dict[str, float]],
                    reference: dict[str, float] | None = None) -> dict[str, Any]:
        vectors, records = self.vectors(paradigm, candidate, seed)
        add = self.addition(paradigm, candidate, seed)
        neg = self.negation(paradigm, candidate, seed)
        tasks = list(vectors)
        cosines = [[vectors[a].cosine(vectors[b]) for b in tasks] for a in tasks]
        off = [cosines[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        headline = self.config.negation_thresholds[0]
        negation_rows = {t: _threshold_row(neg[t], headline) for t in tasks}
        record = {
            "model": self.config.model, "paradigm": paradigm, "variant": variant,
            "form": candidate.form, "lambda": candidate.lam, "lr": candidate.lr, "seed": seed,
            "pretrained_acc": _mean(pre[t]["test"] for t in tasks),
            "finetuned_acc": _mean(records[t]["test_acc"] for t in tasks),
            "finetuned_per_task": {t: records[t]["test_acc"] for t in tasks},
            "addition": {"alpha": add["alpha"], "abs": add["test_abs"], "norm": add["test_norm"],
                         "per_task": add["per_task"], "val_curve": add.get("val_curve")},
            "negation": {"threshold": headline,
                         "target": _mean(r["target"] for r in negation_rows.values()),
                         "control": _mean(r["control"] for r in negation_rows.values()),
                         "per_task": negation_rows, "all": neg},
            "cosine_mean": _mean(off) if off else 0.0, "cosine_matrix": cosines,
            "vector_norms": {t: vectors[t].norm() for t in tasks},
            "penalty_final": {t: records[t].get("penalty_final") for t in tasks},
            "vectors": {t: self._relative(self.vector_paths[(paradigm, candidate, seed, t)])
                        for t in tasks},
        }
        regime = {t: records[t]["regime"] for t in tasks if records[t].get("regime")}
        if regime:
            record["regime"] = regime
        merges = [m for m in self.config.merges if m != self.config.merge]
        if merges:
            record["merges"] = {m: _addition_row(self.addition(paradigm, candidate, seed, m))
                                for m in merges}
        mech = self.config.mechanism
        if mech.xi:
            record["xi"] = self.disentanglement(paradigm, candidate, seed)
        if reference is not None:
            matched = {"scale": {t: reference[t] / max(vectors[t].norm(), 1e-30) for t in tasks},
                       "addition": _addition_row(self.addition(paradigm, candidate, seed,
                                                               scale_to=reference))}
            if mech.xi:
                matched["xi"] = self.disentanglement(paradigm, candidate, seed, reference)
            record["norm_matched"] = matched
        return record

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.ws.root).as_posix()


def regime_series(regime: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Per logged step, the spread of ΔW's spectra over the penalised matrices: the largest
    σ_max, the median over matrices of σ_max and of the median σ, the mean R/√n and the
    total ‖ΔW‖_F — what says whether the penalty left its small-ΔW regime (σ ≪ 1)."""
    if not regime:
        return None
    series = []
    for entry in regime:
        mats = list(entry["matrices"].values())
        if not mats:
            continue
        series.append({
            "step": entry["step"],
            "sigma_max": max(m["sigma_max"] for m in mats),
            "sigma_max_median": statistics.median(m["sigma_max"] for m in mats),
            "sigma_median_median": statistics.median(m["sigma_median"] for m in mats),
            "r_over_sqrt_n": statistics.fmean(m["r_over_sqrt_n"] for m in mats),
            "fro": sum(m["fro"] ** 2 for m in mats) ** 0.5,
        })
    return series


def merge_alphas(method: str, fallback: list[float]) -> list[float]:
    """The merge method's reference α grid (registry metadata), else ``fallback``."""
    from orthoreg import merging

    default_alphas = getattr(merging, "default_alphas", None)
    return list(default_alphas(method)) if default_alphas is not None else list(fallback)


def rescaled(vectors: dict[str, TaskVector], norms: dict[str, float]) -> dict[str, TaskVector]:
    """Each task's vector scaled to the given norm (the norm-matched comparison)."""
    out = {}
    for task, vector in vectors.items():
        norm = vector.norm()
        if not norm > 0:
            raise ValueError(f"task {task!r}: a zero task vector cannot be rescaled")
        out[task] = vector * (norms[task] / norm)
    return out


def link_vectors(root: Path, runs: list[dict[str, Any]], first_seed: int) -> dict[str, str]:
    """Readable links to the task vectors: ``vectors/<paradigm>/<variant>/<task>.safetensors``
    for the first seed, ``…/<variant>/seed<k>/<task>.safetensors`` for the others; each a
    relative symlink to the cached stage file (a copy where links are not supported).
    Returns link → target, both relative to ``root``."""
    index = {}
    for run in runs:
        folder = root / "vectors" / run["paradigm"] / run["variant"]
        if run["seed"] != first_seed:
            folder = folder / f"seed{run['seed']}"
        folder.mkdir(parents=True, exist_ok=True)
        for task, target in run["vectors"].items():
            link = folder / f"{task}.safetensors"
            relative = os.path.relpath(root / target, folder)
            if link.is_symlink() or link.exists():
                link.unlink()
            try:
                link.symlink_to(relative)
            except OSError:  # e.g. a filesystem without symlinks
                atomic_write_bytes(link, (root / target).read_bytes())
            index[link.relative_to(root).as_posix()] = target
    return index


def _addition_row(result: dict[str, Any]) -> dict[str, Any]:
    return {"merge": result.get("merge"), "alpha": result["alpha"], "abs": result["test_abs"],
            "norm": result["test_norm"], "val_abs": result["val_abs"]}


def _threshold_row(negation: dict[str, Any], threshold: float) -> dict[str, Any]:
    for row in negation["thresholds"]:
        if abs(row["threshold"] - threshold) < 1e-9:
            return {"alpha": row["alpha"], "target": row["test_target"],
                    "control": row["test_control"], "feasible": row["feasible"]}
    raise KeyError(f"negation result has no threshold {threshold}")


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for each (paradigm, variant)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["paradigm"], run["variant"]), []).append(run)
    metrics = {
        "pretrained_acc": lambda r: r["pretrained_acc"],
        "finetuned_acc": lambda r: r["finetuned_acc"],
        "addition_abs": lambda r: r["addition"]["abs"],
        "addition_norm": lambda r: r["addition"]["norm"],
        "addition_alpha": lambda r: r["addition"]["alpha"],
        "negation_target": lambda r: r["negation"]["target"],
        "negation_control": lambda r: r["negation"]["control"],
        "cosine_mean": lambda r: r["cosine_mean"],
        "vector_norm": lambda r: _mean(r["vector_norms"].values()),
        "xi": lambda r: r["xi"]["mean"],
        "matched_addition_abs": lambda r: r["norm_matched"]["addition"]["abs"],
        "matched_addition_norm": lambda r: r["norm_matched"]["addition"]["norm"],
        "matched_xi": lambda r: r["norm_matched"]["xi"]["mean"],
        "sigma_max_final": lambda r: _mean(s[-1]["sigma_max"] for s in r["regime"].values()),
        "r_over_sqrt_n_final": lambda r: _mean(s[-1]["r_over_sqrt_n"]
                                               for s in r["regime"].values()),
    }
    for method in sorted({m for run in runs for m in run.get("merges", {})}):
        metrics[f"{method}_abs"] = lambda r, m=method: r["merges"][m]["abs"]
        metrics[f"{method}_norm"] = lambda r, m=method: r["merges"][m]["norm"]
    rows = []
    for (paradigm, variant), group in groups.items():
        row: dict[str, Any] = {"paradigm": paradigm, "variant": variant, "seeds": len(group),
                               "form": group[0].get("form", "paper"),
                               "lambda": group[0]["lambda"], "lr": group[0]["lr"]}
        for name, get in metrics.items():
            try:
                values = [float(get(r)) for r in group]
            except (KeyError, TypeError, IndexError):  # a measurement this run did not make
                continue
            row[name] = statistics.fmean(values)
            row[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows
