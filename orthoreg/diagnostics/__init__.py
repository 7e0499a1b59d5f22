"""Diagnostics that explain composability (DESIGN.md §2), one module per link of the chain.

OrthoReg's argument (Liu et al. 2026) runs: task-feature specialization → orthogonal task
vectors → weight disentanglement → good task arithmetic. Each link can be looked at for
any backbone + heads + task vectors, without an experiment:

- :mod:`~orthoreg.diagnostics.specialization` — TFS: per-layer overlap of the input
  features each task relies on (:func:`task_feature_specialization`);
- :mod:`~orthoreg.diagnostics.orthogonality` — cosines between task vectors, per-layer
  R(ΔW), singular spectra and column-angle histograms of each ΔW;
- :mod:`~orthoreg.diagnostics.disentanglement` — the weight-disentanglement error
  ξ(α1, α2) of Ortiz-Jiménez et al. (2023) on a grid, in place on one resident model;
- :mod:`~orthoreg.diagnostics.plots` — the figures. Running all of it over a finished run
  directory (``orthoreg diagnose --run DIR``) is the experiment's job:
  :mod:`orthoreg.experiment.diagnose`.

Without an experiment::

    from orthoreg.diagnostics import TaskProbe, disentanglement_error, cosine_matrix
    from orthoreg.diagnostics import task_feature_specialization, orthogonality_report
    from orthoreg.diagnostics.plots import plot_disentanglement

    probes = [TaskProbe("mnist", head_mnist, (x_mnist, y_mnist)),
              TaskProbe("fashion", head_fashion, (x_fashion, y_fashion))]
    xi = {variant: disentanglement_error(backbone, probes, [tau_mnist, tau_fashion])
          for variant, (tau_mnist, tau_fashion) in vectors.items()}   # 13×13 over [−3, 3]
    plot_disentanglement(xi, "xi.png")            # one colour scale for all variants
    tfs = task_feature_specialization(backbone, probes)   # Jaccard per layer, and chance

Every function leaves the backbone's weights, flags and modes as it found them.
"""

from orthoreg.diagnostics.base import TaskProbe, subsample
from orthoreg.diagnostics.disentanglement import (
    DEFAULT_POINTS,
    DEFAULT_RANGE,
    DISK_RADIUS,
    DisentanglementMap,
    alpha_grid,
    disentanglement_error,
)
from orthoreg.diagnostics.orthogonality import (
    alignment_by_parameter,
    angle_histogram,
    column_angles,
    cosine_matrix,
    effective_rank,
    layer_cosines,
    layer_penalties,
    matrices,
    orthogonality_report,
    singular_values,
    vector_angles,
)
from orthoreg.diagnostics.specialization import (
    OBJECTIVES,
    SpecializationResult,
    attribution_mass,
    chance_jaccard,
    feature_layers,
    jaccard,
    register_objective,
    specialized_set,
    task_feature_specialization,
)

__all__ = [
    "DEFAULT_POINTS",
    "DEFAULT_RANGE",
    "DISK_RADIUS",
    "OBJECTIVES",
    "DisentanglementMap",
    "SpecializationResult",
    "TaskProbe",
    "alignment_by_parameter",
    "alpha_grid",
    "angle_histogram",
    "attribution_mass",
    "chance_jaccard",
    "column_angles",
    "cosine_matrix",
    "disentanglement_error",
    "effective_rank",
    "feature_layers",
    "jaccard",
    "layer_cosines",
    "layer_penalties",
    "matrices",
    "orthogonality_report",
    "register_objective",
    "singular_values",
    "specialized_set",
    "subsample",
    "task_feature_specialization",
    "vector_angles",
]
