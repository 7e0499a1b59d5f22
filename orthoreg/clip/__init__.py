"""The paper's CLIP recipe: open_clip ViTs from local weights, the 8 image tasks, the runs.

Apart from the embedded benchmarks (:mod:`orthoreg.zoo`) because it shares almost nothing
with them but the pipeline's lower layers: it needs open_clip and torchvision (the ``clip``
extra, its own environment: ``scripts/clip_env.sh``) and reads weights and datasets from
local paths the user provides (docs/CLIP.md).

- :mod:`~orthoreg.clip.model` — local-weights open_clip models, the image tower as a
  backbone, zero-shot heads from the text tower (built with :mod:`orthoreg.heads`);
- :mod:`~orthoreg.clip.data` — the datasets' folder layout, splits, cached decoding;
- :mod:`~orthoreg.clip.templates` — class names and prompt templates per dataset;
- :mod:`~orthoreg.clip.recipe` — the authors' hyper-parameters per paradigm and model;
- :mod:`~orthoreg.clip.run` — one fine-tune per (model, task, paradigm, λ), addition and
  negation over finished runs, single process or torchrun.

Nothing is imported here, so ``import orthoreg.clip`` never needs open_clip.
"""
