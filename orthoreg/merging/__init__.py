"""Merge methods as a registry of pure functions over task vectors.

    >>> from orthoreg import merging
    >>> merging.available()
    ('dare', 'dare_ties', 'iso_c', 'task_arithmetic', 'ties', 'tsv')
    >>> merged = merging.merge("ties", [tau_a, tau_b], density=0.2)   # doctest: +SKIP

Every method returns the merged *task vector*; the caller applies θ0 + α·merged and
searches α. Inputs must share keys, shapes, dtypes, base model and paradigm
(TaskVectorMismatch otherwise, before any work); hyper-parameters are validated by name
(ValueError naming the parameter and the method). ``get(name).describe()`` gives the
paper and the defaults; ``get(name).doc`` the equations and choices.
"""

from orthoreg.merging.linear import task_arithmetic
from orthoreg.merging.registry import MergeMethod, available, get, merge, register
from orthoreg.merging.sparse import dare, dare_ties, ties
from orthoreg.merging.spectral import iso_c, tsv

__all__ = [
    "MergeMethod",
    "available",
    "dare",
    "dare_ties",
    "get",
    "iso_c",
    "merge",
    "register",
    "task_arithmetic",
    "ties",
    "tsv",
]
