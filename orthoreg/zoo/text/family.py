"""The text family: a sentence encoder on text tasks with frozen zero-shot heads.

The heads are CLIP's construction (:mod:`orthoreg.heads`) with the encoder's own prompt
embeddings: per class, the renormalised mean of ``normalize(encode(template.format(name)))``
over the task's templates; logits = ``scale · cos(f(x), W_c)``. The head therefore exists
before any fine-tuning, is frozen, and the pipeline's "pretrained" accuracy of a task *is*
its zero-shot accuracy.

Logit scale: :data:`LOGIT_SCALE` = 20, the inverse temperature all-MiniLM-L6-v2 was trained
with (its in-batch-negatives cross-entropy multiplies cosines by 20, the analogue of CLIP's
learned 100). Argmax — hence every accuracy — does not depend on it; it sets how sharp the
softmax is that fine-tuning's cross-entropy sees, and 20 is the sharpness this encoder's
cosines were shaped for.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

from orthoreg.errors import ConfigError
from orthoreg.heads import ZeroShotHead, zeroshot_weights
from orthoreg.zoo.registry import PreparedTask
from orthoreg.zoo.text import classnames, datasets, model

LOGIT_SCALE = 20.0
#: prompts are short; this bounds them without cutting any template × class name here
PROMPT_MAX_LENGTH = 64
DEFAULT_MAX_LENGTH = 64


class TextFamily:
    """Token ids (N, data.max_length) per split; zero-shot heads from class-name prompts."""

    name = "text"
    control = datasets.CONTROL_TASK

    def models(self) -> Collection[str]:
        return model.MODELS

    def tasks(self) -> Collection[str]:
        return datasets.TASKS

    def get_model(self, name: str) -> nn.Module:
        return model.get_model(name)

    @staticmethod
    def _max_length(backbone: nn.Module, data: Any) -> int:
        length = int(getattr(data, "max_length", DEFAULT_MAX_LENGTH))
        limit = int(backbone.config.max_position_embeddings)
        if not 4 <= length <= limit:
            raise ConfigError(f"config key 'data.max_length': {length} is out of range for "
                              f"{backbone.name} (expected 4..{limit} tokens)")
        return length

    def prepare(self, backbone: nn.Module, task: str, data: Any) -> PreparedTask:
        tokenizer = model.get_tokenizer(backbone.name)
        raw_classes = datasets.TASKS[task]().classes
        names = classnames.classnames_for(task, raw_classes)  # before any tokenising
        text_task = datasets.get_task(task, tokenizer, self._max_length(backbone, data),
                                      seed=data.split_seed, max_train=data.max_train,
                                      max_val=data.max_val, max_test=data.max_test)
        if int(text_task.train.ids.max()) >= backbone.config.vocab_size:
            raise model.TokenizerMismatch(f"task {task!r}: a token id exceeds the embedding of "
                                          f"{backbone.name}")
        splits = text_task.datasets()
        info = {**text_task.info, "classnames": names,
                "templates": list(classnames.templates_for(task))}
        return PreparedTask(task, names, splits["train"], splits["val"], splits["test"],
                            dict(text_task.splits), info)

    def head_spec(self, model_name: str, prepared: PreparedTask, data: Any) -> dict[str, Any]:
        source = model.MODELS[model_name].asset
        return {"family": self.name, "model": model_name, "weights": source,
                "task": prepared.name, "classnames": list(prepared.classes),
                "templates": list(classnames.templates_for(prepared.name)),
                "scale": LOGIT_SCALE, "prompt_max_length": PROMPT_MAX_LENGTH}

    def build_head(self, backbone: nn.Module, prepared: PreparedTask, data: Any) -> nn.Module:
        """Zero-shot head of the *pretrained* encoder (the pipeline passes θ0)."""
        templates = classnames.templates_for(prepared.name)
        weight = zeroshot_weights(lambda prompts: backbone.embed(prompts, PROMPT_MAX_LENGTH),
                                  prepared.classes, templates)
        return ZeroShotHead(weight, LOGIT_SCALE, {
            "task": prepared.name, "classnames": list(prepared.classes),
            "templates": list(templates), "model": backbone.name})

    def save_head(self, head: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        head.metadata.update(metadata)
        head.save(path)

    def load_head(self, path: Path) -> nn.Module:
        return ZeroShotHead.load(path)


FAMILY = TextFamily()
