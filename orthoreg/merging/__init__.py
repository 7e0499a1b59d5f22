"""Merge methods as a registry of pure functions over task vectors.

    >>> from orthoreg import merging
    >>> merging.available()
    ('dare', 'dare_ties', 'iso_c', 'task_arithmetic', 'ties', 'tsv')
    >>> merged = merging.merge("ties", [tau_a, tau_b], density=0.2)   # doctest: +SKIP

Every method returns the merged *task vector*; the caller applies θ0 + α·merged and
searches α. Inputs must share keys, shapes, dtypes, base model and paradigm
(TaskVectorMismatch otherwise, before any work); hyper-parameters are validated by name
(ValueError naming the parameter and the method). ``get(name).describe()`` gives the
paper and the defaults; ``get(name).doc`` the equations and choices;
``default_alphas(name)`` the α grid the method's reference searched (task arithmetic and
DARE 0…1, the means and re-scaled merges 0.1…3.0); ``paper_params(name)`` the paper's
hyper-parameters where they differ from the defaults (DARE's drop rate 0.9).
"""

from orthoreg.merging.linear import task_arithmetic
from orthoreg.merging.registry import (
    MergeMethod,
    available,
    default_alphas,
    get,
    merge,
    paper_params,
    register,
)
from orthoreg.merging.sparse import dare, dare_ties, ties
from orthoreg.merging.spectral import iso_c, tsv

__all__ = [
    "MergeMethod",
    "available",
    "dare",
    "dare_ties",
    "default_alphas",
    "get",
    "iso_c",
    "merge",
    "paper_params",
    "register",
    "task_arithmetic",
    "ties",
    "tsv",
]
