"""Apply the text benchmark's learning-rate rule on VALIDATION splits only (docs/TEXT.md).

    python scripts/calibrate_text_lr.py [--config text] [--out runs/text-calibration]

Per paradigm, baseline (λ = 0) single-task fine-tunes with the config's steps, batch and
data, at rungs of the ladder LADDER, each scored by the mean validation accuracy over the
config's tasks. The rule: the smallest rung whose mean beats the zero-shot (pretrained)
mean by ≥ MARGIN; if none does, the best rung reached before a step up stopped improving.
The walk starts at START (LoRA one rung higher); while the rung passes it steps down, else
up. No test split is ever evaluated here. Results are appended to ``<out>/calibration.json``
after every rung, so an interrupted run resumes. Not collected by pytest (no ``test_``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
MARGIN = 0.10
START = {"full": 1e-4, "linear": 1e-4, "partial": 1e-4, "lora": 1e-3}


class Walk:
    """The rule as a walk on the ladder: down while rungs pass, else up while they improve."""

    def __init__(self, start: int) -> None:
        self.index, self.direction, self.done = start, 0, False
        self.chosen = start
        self.best: tuple[float, int] | None = None

    def step(self, passes: bool, score: float) -> None:
        if self.direction == 0:  # the first rung decides the direction
            self.direction = -1 if passes else 1
        if self.direction < 0:
            if passes:
                self.chosen = self.index
                if self.index == 0:
                    self.done = True
                self.index -= 1
            else:  # the rung below fails: the last passing one is the smallest
                self.done = True
            return
        if self.best is not None and score <= self.best[0]:
            self.chosen, self.done = self.best[1], True  # a step up did not improve
            return
        self.best = (score, self.index)
        if passes or self.index + 1 == len(LADDER):
            self.chosen, self.done = self.index, True
        else:
            self.index += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="text")
    parser.add_argument("--out", default="runs/text-calibration")
    parser.add_argument("--paradigms", nargs="*", default=None)
    args = parser.parse_args(argv)

    from orthoreg.cli.commands import builtin_config
    from orthoreg.evaluation import accuracy
    from orthoreg.experiment import Experiment, load_config
    from orthoreg.experiment.pipeline import PARADIGM_BUILDERS, Candidate
    from orthoreg.training import finetune
    from orthoreg.utils.io import atomic_write_json
    from orthoreg.utils.provenance import seed_everything

    path = Path(args.config)
    config = load_config(path if path.suffix else builtin_config(args.config))
    out = Path(args.out)
    record_path = out / "calibration.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    experiment = Experiment(config, out / "heads", log=lambda _: None, progress=False)
    with experiment.ws:
        experiment._load()  # backbone, prepared tasks, zero-shot heads (no test evaluation)
        tasks = list(config.tasks)
        pre = {t: accuracy(experiment.backbone, experiment.tasks[t].head, experiment.tasks[t].val)
               for t in tasks}
        record["pretrained_val"] = pre
        record["pretrained_val_mean"] = statistics.fmean(pre.values())
        record.setdefault("rule", {"ladder": LADDER, "margin": MARGIN, "start": START,
                                   "steps": config.train.steps,
                                   "batch_size": config.train.batch_size})
        atomic_write_json(record_path, record)
        print(f"zero-shot val mean {record['pretrained_val_mean']:.3f}: {pre}", flush=True)
        seed = config.seeds[0]

        def rung(paradigm: str, lr: float) -> float:
            key = f"{paradigm}@{lr:g}"
            if key in record.get("rungs", {}):
                return record["rungs"][key]["mean"]
            started = time.perf_counter()
            accs = {}
            for task in tasks:
                seed_everything(seed)
                model = PARADIGM_BUILDERS[paradigm](config.paradigms[paradigm]).prepare(
                    copy.deepcopy(experiment.backbone))
                train_cfg = experiment._train_config(Candidate("baseline", lr, 0.0), seed)
                data = experiment.tasks[task]
                finetune(model, data.head, data.train, train_cfg)
                model.eval()
                accs[task] = accuracy(model, data.head, data.val)
            mean = statistics.fmean(accs.values())
            record.setdefault("rungs", {})[key] = {
                "paradigm": paradigm, "lr": lr, "mean": mean, "per_task": accs,
                "seconds": round(time.perf_counter() - started, 1)}
            atomic_write_json(record_path, record)
            print(f"{key}: val mean {mean:.3f} ({time.perf_counter() - started:.0f} s) {accs}",
                  flush=True)
            return mean

        target = record["pretrained_val_mean"] + MARGIN
        chosen = record.setdefault("chosen", {})
        walks = {p: Walk(LADDER.index(START[p])) for p in args.paradigms or config.paradigms}
        # breadth first: every paradigm's next rung before any paradigm's one after it, so
        # an interrupted calibration has looked at every paradigm
        while any(not w.done for w in walks.values()):
            for paradigm, walk in walks.items():
                if not walk.done:
                    walk.step(rung(paradigm, LADDER[walk.index]) >= target,
                              rung(paradigm, LADDER[walk.index]))
                    if walk.done:
                        chosen[paradigm] = LADDER[walk.chosen]
                        atomic_write_json(record_path, record)
                        print(f"chosen {paradigm}: lr {LADDER[walk.chosen]:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
