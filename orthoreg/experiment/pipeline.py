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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg.errors import ConfigError
from orthoreg.experiment.config import ExperimentConfig, ParadigmConfig
from orthoreg.experiment.workspace import Workspace, stage_key
from orthoreg.paradigms import Paradigm, get_paradigm
from orthoreg.taskvector import TaskVector
from orthoreg.training import TrainConfig, finetune
from orthoreg.utils.io import atomic_write_json
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


@dataclass(frozen=True)
class Candidate:
    variant: str  # "baseline" | "orthoreg"
    lr: float
    lam: float

    @property
    def label(self) -> str:
        return f"{self.variant}(lr={self.lr:g}, λ={self.lam:g})"


def candidates(config: ExperimentConfig, paradigm: str) -> list[Candidate]:
    base_lr = config.paradigms[paradigm].lr
    baseline = [Candidate("baseline", base_lr * m, 0.0) for m in config.selection.lr_multipliers]
    ortho = [Candidate("orthoreg", base_lr, lam) for lam in config.selection.lambdas]
    return baseline + ortho


class Experiment:
    """Runs one config in one output directory (see module docstring)."""

    def __init__(self, config: ExperimentConfig, out: str | Path, log: Log = print,
                 progress: bool = True) -> None:
        self.config = config
        self.ws = Workspace(out)
        self.log = log
        self.progress = progress
        self.device = torch.device(config.device)
        self.timings: dict[str, float] = {}

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
                    len(prepared.classes), dict(prepared.splits))

    # ------------------------------------------------------------------ stages
    def _train_config(self, candidate: Candidate, seed: int) -> TrainConfig:
        t = self.config.train
        return TrainConfig(steps=t.steps, batch_size=t.batch_size, lr=candidate.lr,
                           weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                           grad_clip=t.grad_clip, accumulation=t.accumulation,
                           label_smoothing=t.label_smoothing, lam=candidate.lam,
                           squared=t.squared, estimator=t.estimator, probes=t.probes,
                           seed=seed, checkpoint_every=max(10, t.steps // 4),
                           log_every=max(1, t.steps // 10), progress=self.progress)

    def finetune(self, paradigm: str, candidate: Candidate, seed: int,
                 task: str) -> tuple[TaskVector, dict[str, Any]]:
        """One cached fine-tuning stage → (task vector, record with accuracies)."""
        from orthoreg.evaluation import accuracy

        pcfg = self.config.paradigms[paradigm]
        train_cfg = self._train_config(candidate, seed)
        spec = {"model": self.config.model, "task": task, "paradigm": paradigm,
                "paradigm_options": asdict(pcfg), "train": train_cfg.resume_key(),
                "data": asdict(self.config.data), "splits": self.tasks[task].splits}
        key = stage_key("finetune", spec)
        folder = self.ws.stage_dir(key)
        vector_path = folder / "vector.safetensors"
        record = self.ws.done(key)
        if record is not None and vector_path.is_file():
            return TaskVector.load(vector_path, device=self.device), record
        self.log(f"  fine-tune {paradigm:7s} {candidate.label:32s} seed={seed} task={task}")
        seed_everything(seed)
        model = PARADIGM_BUILDERS[paradigm](pcfg).prepare(copy.deepcopy(self.backbone))
        model.to(self.device)
        data = self.tasks[task]
        result = finetune(model, data.head, data.train, train_cfg, workdir=folder)
        model.eval()
        vector = model.task_vector({
            "task": task, "lambda": candidate.lam, "lr": candidate.lr, "seed": seed,
            "squared": train_cfg.squared, "steps": train_cfg.steps, "model": self.config.model,
            **provenance(seed),
        })
        vector.save(vector_path)
        record = {
            "task": task, "paradigm": paradigm, "candidate": asdict(candidate), "seed": seed,
            "val_acc": accuracy(model, data.head, data.val),
            "test_acc": accuracy(model, data.head, data.test),
            "train_seconds": result.seconds, "final": result.final,
            "penalty_final": result.final.get("penalty"),
        }
        (folder / "checkpoint.safetensors").unlink(missing_ok=True)  # the vector supersedes it
        return vector, self.ws.finish(key, record)

    def vectors(self, paradigm: str, candidate: Candidate,
                seed: int) -> tuple[dict[str, TaskVector], dict[str, dict[str, Any]]]:
        vectors, records = {}, {}
        for task in self.config.tasks:
            vectors[task], records[task] = self.finetune(paradigm, candidate, seed, task)
        return vectors, records

    def addition(self, paradigm: str, candidate: Candidate, seed: int) -> dict[str, Any]:
        from orthoreg.evaluation import TaskEval, addition

        vectors, records = self.vectors(paradigm, candidate, seed)
        key = stage_key("addition", {
            "vectors": {t: records[t]["candidate"] | {"seed": seed, "paradigm": paradigm,
                                                      "acc": records[t]["val_acc"]}
                        for t in vectors},
            "alphas": self.config.alphas.values(), "merge": self.config.merge,
            "spec": [self.config.model, asdict(self.config.data), asdict(self.config.train),
                     asdict(self.config.paradigms[paradigm])],
        })
        cached = self.ws.done(key)
        if cached is not None:
            return cached
        evals = {t: TaskEval(t, self.tasks[t].head, self.tasks[t].val, self.tasks[t].test)
                 for t in vectors}
        finetuned = {t: {"val": r["val_acc"], "test": r["test_acc"]} for t, r in records.items()}
        result = addition(self.backbone, evals, vectors, finetuned,
                          alphas=self.config.alphas.values(), merge=self.config.merge)
        return self.ws.finish(key, result.to_dict())

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
                "spec": [self.config.model, asdict(self.config.data), asdict(self.config.train),
                         asdict(self.config.paradigms[paradigm])],
            })
            cached = self.ws.done(key)
            if cached is None:
                t = self.tasks[task]
                result = negation(self.backbone, TaskEval(task, t.head, t.val, t.test),
                                  control_eval, vector, alphas=self.config.alphas.values(),
                                  thresholds=self.config.negation_thresholds)
                cached = self.ws.finish(key, result.to_dict())
            out[task] = cached
        return out

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

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        with self.ws:
            atomic_write_json(self.ws.root / "config.json",
                              {"config": self.config.to_dict(), **provenance()})
            self._load()
            pre = self.pretrained()
            runs, selections = [], {}
            seeds = list(self.config.seeds)
            for paradigm in self.config.paradigms:
                self.log(f"[{paradigm}]")
                chosen = self.select(paradigm, seeds[0])
                selections[paradigm] = {v: {"lr": c["candidate"].lr, "lambda": c["candidate"].lam,
                                            "grid": c["grid"]} for v, c in chosen.items()}
                for seed in seeds:
                    if self.config.selection.on_seed == "each" and seed != seeds[0]:
                        chosen = self.select(paradigm, seed)
                    for variant, choice in chosen.items():
                        runs.append(self._run_record(paradigm, variant, choice["candidate"],
                                                     seed, pre))
            results = {
                "name": self.config.name, "model": self.config.model,
                "tasks": list(self.config.tasks), "control": self.control_name,
                "pretrained": pre, "selection": selections, "runs": runs,
                "summary": summarize(runs),
                "timings": {**self.timings, "total": time.perf_counter() - started},
                "config": self.config.to_dict(), **provenance(),
            }
            atomic_write_json(self.ws.root / "results.json", results)
            from orthoreg.experiment.report import write_report

            write_report(self.ws.root, results)
        return results

    def _run_record(self, paradigm: str, variant: str, candidate: Candidate, seed: int,
                    pre: dict[str, dict[str, float]]) -> dict[str, Any]:
        vectors, records = self.vectors(paradigm, candidate, seed)
        add = self.addition(paradigm, candidate, seed)
        neg = self.negation(paradigm, candidate, seed)
        tasks = list(vectors)
        cosines = [[vectors[a].cosine(vectors[b]) for b in tasks] for a in tasks]
        off = [cosines[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        headline = self.config.negation_thresholds[0]
        negation_rows = {t: _threshold_row(neg[t], headline) for t in tasks}
        return {
            "model": self.config.model, "paradigm": paradigm, "variant": variant,
            "lambda": candidate.lam, "lr": candidate.lr, "seed": seed,
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
        }


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
    }
    rows = []
    for (paradigm, variant), group in groups.items():
        row: dict[str, Any] = {"paradigm": paradigm, "variant": variant, "seeds": len(group),
                               "lambda": group[0]["lambda"], "lr": group[0]["lr"]}
        for name, get in metrics.items():
            values = [float(get(r)) for r in group]
            row[name] = statistics.fmean(values)
            row[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows
