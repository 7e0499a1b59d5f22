"""Time the pieces of the text benchmark in CPU seconds (docs/TEXT.md, "Budget").

    OMP_NUM_THREADS=1 python scripts/time_text_pieces.py election2016 crowdflower

Prints the zero-shot val accuracy and evaluation cost per task (100 val examples), one
fine-tune step per paradigm (batch ``B`` = 16, ``L`` = 32 tokens, ``STEPS`` steps timed),
and one addition search (11 α, val 100 / test 300 per task) for full and linear
fine-tuning. CPU seconds (``time.process_time``) with one thread: on a shared machine the
wall clock measures the other users. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any


def clock(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, CPU seconds, wall seconds) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = work()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main(names: list[str]) -> dict[str, float]:
    import torch

    from orthoreg.evaluation import TaskEval, accuracy, addition
    from orthoreg.experiment.config import ParadigmConfig
    from orthoreg.experiment.pipeline import PARADIGM_BUILDERS
    from orthoreg.training import TrainConfig, finetune
    from orthoreg.zoo.registry import family_of

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    length, batch = int(os.environ.get("L", "32")), int(os.environ.get("B", "16"))
    steps = int(os.environ.get("STEPS", "3"))
    family = family_of("all_minilm_l6_v2")
    backbone = family.get_model("all_minilm_l6_v2").eval().requires_grad_(False)
    data = SimpleNamespace(max_train=1000, max_val=100, max_test=300, split_seed=0,
                           max_length=length)
    tasks = {}
    for name in names:
        prepared = family.prepare(backbone, name, data)
        tasks[name] = (prepared, family.build_head(backbone, prepared, data))
    seconds: dict[str, float] = {}
    for name, (prepared, head) in tasks.items():
        acc, cpu, wall = clock(lambda p=prepared, h=head: accuracy(backbone, h, p.val))
        seconds[f"eval_val100_{name}"] = cpu
        print(f"{name}: zero-shot val {acc:.3f}, eval cpu {cpu:.2f} s, wall {wall:.1f} s")
    options = {"full": ParadigmConfig(lr=1e-4), "linear": ParadigmConfig(lr=1e-4),
               "partial": ParadigmConfig(lr=1e-4, select="bert_attention"),
               "lora": ParadigmConfig(lr=1e-3, targets="bert_attention", rank=8, alpha=8)}
    prepared, head = next(iter(tasks.values()))
    for paradigm, option in options.items():
        model = PARADIGM_BUILDERS[paradigm](option).prepare(copy.deepcopy(backbone))
        config = TrainConfig(steps=steps, batch_size=batch, lr=option.lr, warmup_steps=1,
                             progress=False, lam=float(os.environ.get("LAM", "0")))
        result, cpu, wall = clock(lambda m=model, c=config: finetune(m, head, prepared.train, c))
        seconds[f"step_{paradigm}"] = cpu / steps
        print(f"{paradigm}: cpu/step {cpu / steps:.2f} s, wall/step {wall / steps:.2f} s, "
              f"loss {result.final.get('task_loss'):.3f}")
        if paradigm not in ("full", "linear"):
            continue
        vectors = {}
        for name, (task, task_head) in tasks.items():
            tuned = PARADIGM_BUILDERS[paradigm](option).prepare(copy.deepcopy(backbone))
            finetune(tuned, task_head, task.train, TrainConfig(
                steps=1, batch_size=batch, lr=option.lr, warmup_steps=1, progress=False))
            vectors[name] = tuned.eval().task_vector()
        evals = {n: TaskEval(n, h, p.val, p.test) for n, (p, h) in tasks.items()}
        finetuned = {n: {"val": 0.9, "test": 0.9} for n in tasks}
        _, cpu, wall = clock(lambda v=vectors, e=evals, f=finetuned: addition(
            backbone, e, v, f, alphas=[i / 10 for i in range(11)]))
        seconds[f"addition_{paradigm}_{len(tasks)}tasks"] = cpu
        print(f"{paradigm}: addition search (11 α, {len(tasks)} tasks) cpu {cpu:.1f} s, "
              f"wall {wall:.1f} s")
    print(json.dumps(seconds))
    return seconds


if __name__ == "__main__":
    main(sys.argv[1:] or ["election2016", "crowdflower"])
