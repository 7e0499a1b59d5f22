"""The image family: ImageNet CNNs on grey-scale tasks with frozen prototype heads."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

from orthoreg.zoo.registry import PreparedTask
from orthoreg.zoo.vision import datasets, heads, models


class VisionFamily:
    """Images resized and normalised for the backbone; heads fitted on ``data.shots`` images."""

    name = "vision"
    control = datasets.CONTROL_TASK

    def models(self) -> Collection[str]:
        return models.MODELS

    def tasks(self) -> Collection[str]:
        return datasets.TASKS

    def get_model(self, name: str) -> nn.Module:
        return models.get_model(name)

    def prepare(self, backbone: nn.Module, task: str, data: Any) -> PreparedTask:
        raw = datasets.get_task(task, seed=data.split_seed, max_train=data.max_train,
                                max_val=data.max_val, max_test=data.max_test)
        splits = datasets.task_datasets(raw, data.resolution, backbone.mean, backbone.std)
        return PreparedTask(task, list(raw.classes), splits["train"], splits["val"],
                            splits["test"], dict(raw.splits), {})

    def head_spec(self, model: str, prepared: PreparedTask, data: Any) -> dict[str, Any]:
        return {"model": model, "task": prepared.name, "splits": prepared.splits,
                "shots": data.shots, "resolution": data.resolution, "seed": data.split_seed}

    def build_head(self, backbone: nn.Module, prepared: PreparedTask, data: Any) -> nn.Module:
        train_x, train_y = prepared.train.tensors
        return heads.fit_head(backbone, train_x, train_y, len(prepared.classes),
                              shots=data.shots, seed=data.split_seed)

    def save_head(self, head: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        head.save(path, metadata)

    def load_head(self, path: Path) -> nn.Module:
        return heads.Head.load(path)


FAMILY = VisionFamily()
