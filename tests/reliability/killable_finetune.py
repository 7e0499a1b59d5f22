"""A small fine-tuning run that the crash tests start, SIGKILL and restart.

``python killable_finetune.py WORKDIR VECTOR`` fine-tunes ``tiny_cnn`` on fixed random
images with OrthoReg (λ > 0) and a checkpoint after every step, prints ``step N`` as each
step completes, and writes the task vector to VECTOR at the end. Rerun with the same
WORKDIR it resumes from the checkpoint. :func:`train` is also imported by the test, which
runs it uninterrupted in-process as the reference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from orthoreg import zoo
from orthoreg.paradigms import get_paradigm
from orthoreg.taskvector import TaskVector
from orthoreg.training import TrainConfig, TrainResult, finetune

STEPS = 40
#: seconds slept after each step (in the killable subprocess only), so that random kill
#: times spread over the whole run rather than all landing after its end. Each attempt is
#: killed ≤ 0.3 s after its second step, i.e. ≤ ~8 steps in; three attempts stay well
#: short of STEPS even on an idle machine (a smaller pause let a fast run finish first).
PAUSE = 0.05


def train(workdir: Path, pause: float = 0.0, echo: bool = False) -> tuple[TaskVector, TrainResult]:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    backbone = zoo.get_model("tiny_cnn", seed=0)
    head = nn.Linear(backbone.feature_dim, 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    model = get_paradigm("full").prepare(backbone)
    config = TrainConfig(steps=STEPS, batch_size=8, lr=1e-2, warmup_steps=5, lam=0.5,
                         checkpoint_every=1, log_every=1, progress=False, seed=3)

    def on_log(record: dict[str, float]) -> None:
        if echo:
            print(f"step {int(record['step'])}", flush=True)
        if pause:
            time.sleep(pause)

    result = finetune(model, head, TensorDataset(images, labels), config, workdir, on_log=on_log)
    return model.task_vector({"resumed_from": result.resumed_from}), result


if __name__ == "__main__":
    vector, result = train(Path(sys.argv[1]), pause=PAUSE, echo=True)
    vector.save(sys.argv[2])
    print(f"done resumed_from={result.resumed_from}", flush=True)
