"""A registry that turns a pure merge function into a named, validated method.

Why a registry and not an ``if method == ...`` chain: an experiment config names a merge
method and its hyper-parameters as data (``{"method": "ties", "density": 0.2}``); the
registry is the single place that maps the name to code, rejects a misspelt or
out-of-range hyper-parameter *before* any tensor work, checks that the task vectors can be
combined at all, and stamps the result with the method and the full set of resolved
hyper-parameters (defaults included), so a merged vector on disk says how it was made.

A method is a function ``fn(task_vectors, *, p1=default1, ...) -> TaskVector`` whose
hyper-parameters are keyword-only with defaults; ``register`` demands a constraint for every
one of them and checks the defaults against those constraints at import time.

Each method also carries the coefficient grid its reference searched α on
(:func:`default_alphas`): a plain sum of T task vectors wants α ≲ 1, but TIES and DARE-TIES
return a *mean* of the agreeing values and TSV-M and Iso-C a re-scaled spectrum, whose best
α lies well above 1, so one grid for all would cut their search short. And where the
method's paper used a hyper-parameter other than the library default, the paper's value is
recorded next to it (``paper_params``) for recipes that reproduce a paper.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orthoreg.merging.base import check_mergeable
from orthoreg.taskvector import TaskVector

MergeFunction = Callable[..., TaskVector]

_REGISTRY: dict[str, MergeMethod] = {}

#: task arithmetic's grid (Ilharco et al. 2023; DESIGN.md §2): 0, 0.05, …, 1 (21 points)
UNIT_ALPHAS: tuple[float, ...] = tuple(i / 20 for i in range(21))
#: the TSV reference's grid for TSV-M, TIES and the others, ``np.linspace(0, 3, 31)[1:]``
#: (Gargiulo et al. 2025 code, ``evaluate_task_vector``; Iso-C's code is built on it):
#: 0.1, 0.2, …, 3.0 (30 points)
WIDE_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(1, 31))


# --------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Constraint:
    """A predicate on one hyper-parameter value plus the words that explain it."""

    test: Callable[[Any], bool]
    description: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _is_real(value: Any) -> bool:
    # bool is an int subclass; `density=True` is a bug, not 1.0
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def in_range(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Constraint:
    """A finite real number in the interval [low, high] (either end may be open)."""

    def test(value: Any) -> bool:
        if not _is_real(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    return Constraint(test, f"a real number in {left}{low}, {high}{right}")


def non_negative_int() -> Constraint:
    """An integer ≥ 0 (seeds)."""
    return Constraint(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "an integer >= 0",
    )


def one_of(*choices: Any) -> Constraint:
    """One of a fixed set of values (strategy switches)."""
    return Constraint(lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


def real_sequence() -> Constraint:
    """A non-empty list or tuple of finite real numbers (per-vector weights)."""
    return Constraint(
        lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(map(_is_real, v)),
        "a non-empty list of finite real numbers",
    )


def optional(inner: Constraint) -> Constraint:
    """``None`` (meaning: the method's derived default) or a value satisfying ``inner``."""
    return Constraint(lambda v: v is None or inner(v), f"None or {inner.description}")


# --------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: call it like the function it wraps.

    ``defaults`` are the hyper-parameters used when a caller names none; ``paper`` is the
    reference the implementation follows; ``doc`` is the function's docstring, which
    states the equations and every choice the paper leaves open.
    """

    name: str
    function: MergeFunction = field(repr=False)
    paper: str
    defaults: Mapping[str, Any]
    constraints: Mapping[str, Constraint] = field(repr=False)
    #: the α grid the method's reference searched, and where that grid comes from
    alphas: tuple[float, ...] = UNIT_ALPHAS
    alphas_source: str = "Ilharco et al. 2023 (task arithmetic): 0, 0.05, …, 1"
    #: hyper-parameters the method's paper used where they differ from ``defaults``
    paper_params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.function) or ""

    def describe(self) -> str:
        """One line for listings: name, paper, default hyper-parameters."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
        paper = ", ".join(f"{k}={v!r}" for k, v in self.paper_params.items())
        grid = f"α grid {self.alphas[0]:g}…{self.alphas[-1]:g} ({len(self.alphas)} points)"
        return (f"{self.name}: {self.paper} (defaults: {params}"
                f"{f'; paper: {paper}' if paper else ''}; {grid})")

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``; ValueError naming the first bad parameter."""
        for key in params:
            if key not in self.defaults:
                accepted = ", ".join(self.defaults) or "none"
                raise ValueError(
                    f"merge method {self.name!r}: unknown parameter {key!r} "
                    f"(accepted: {accepted})"
                )
        resolved = {**self.defaults, **params}
        for key, value in resolved.items():
            constraint = self.constraints[key]
            if not constraint(value):
                raise ValueError(
                    f"merge method {self.name!r}: parameter {key!r} must be "
                    f"{constraint.description}, got {value!r}"
                )
        return resolved

    def __call__(self, task_vectors: Iterable[TaskVector], **params: Any) -> TaskVector:
        """Validate ``params``, check the vectors agree, merge, record how."""
        resolved = self.resolve(params)
        vectors = check_mergeable(task_vectors)
        merged = self.function(vectors, **resolved)
        record = {"method": self.name, "params": resolved, "num_vectors": len(vectors)}
        return TaskVector(merged.tensors, {**merged.metadata, "merge": record})


def register(
    name: str,
    *,
    paper: str,
    constraints: Mapping[str, Constraint],
    alphas: Sequence[float] = UNIT_ALPHAS,
    alphas_source: str | None = None,
    paper_params: Mapping[str, Any] | None = None,
) -> Callable[[MergeFunction], MergeMethod]:
    """Decorator: register ``fn(task_vectors, *, hyper=default, ...)`` under ``name``.

    Every keyword-only parameter needs a default and a constraint, and the default must
    satisfy it; so must ``paper_params``; a mistake here is a programming error caught
    when the module is imported. ``alphas`` is the reference's coefficient grid
    (:func:`default_alphas`), ``alphas_source`` where it comes from.
    """

    def decorate(function: MergeFunction) -> MergeMethod:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        signature = inspect.signature(function)
        positional = [
            p for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(positional) != 1:
            raise TypeError(f"merge method {name!r}: take exactly one positional argument, "
                            "the sequence of task vectors")
        defaults: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.kind is param.KEYWORD_ONLY:
                if param.default is param.empty:
                    raise TypeError(f"merge method {name!r}: parameter {param.name!r} "
                                    "needs a default")
                defaults[param.name] = param.default
            elif param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"merge method {name!r}: no *args/**kwargs, name each "
                                "hyper-parameter")
        if set(constraints) != set(defaults):
            raise TypeError(
                f"merge method {name!r}: constraints {sorted(constraints)} do not match "
                f"the keyword-only parameters {sorted(defaults)}"
            )
        grid = tuple(float(alpha) for alpha in alphas)
        if not grid or not all(map(_is_real, grid)):
            raise ValueError(f"merge method {name!r}: alphas must be a non-empty list of "
                             f"finite numbers, got {list(alphas)!r}")
        method = MergeMethod(name, function, paper, dict(defaults), dict(constraints),
                             grid, alphas_source or MergeMethod.alphas_source,
                             dict(paper_params or {}))
        method.resolve({})  # the defaults themselves must be valid
        method.resolve(method.paper_params)  # and so must the paper's values
        for attribute in functools.WRAPPER_ASSIGNMENTS:  # help() and Sphinx see the function
            if hasattr(function, attribute):
                object.__setattr__(method, attribute, getattr(function, attribute))
        object.__setattr__(method, "__wrapped__", function)
        _REGISTRY[name] = method
        return method

    return decorate


def get(name: str) -> MergeMethod:
    """The method registered as ``name``; ValueError listing what is available."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return tuple(sorted(_REGISTRY))


def default_alphas(method: str) -> list[float]:
    """The α grid to search for ``method`` when the caller names none: its reference's.

    ``task_arithmetic`` and ``dare`` (sums, α ≲ 1): 0, 0.05, …, 1; ``ties``, ``dare_ties``
    (means), ``tsv`` and ``iso_c`` (re-scaled spectra): 0.1, 0.2, …, 3.0. ValueError for an
    unknown method, listing the known ones.
    """
    return list(get(method).alphas)


def paper_params(method: str) -> dict[str, Any]:
    """The hyper-parameters ``method``'s paper used where they differ from the defaults."""
    return dict(get(method).paper_params)


def merge(name: str, task_vectors: Sequence[TaskVector], **params: Any) -> TaskVector:
    """Merge ``task_vectors`` with the method ``name``: the merged *task vector*.

    The caller applies it as θ0 + α·merged and searches α; no method here scales its
    output by a coefficient of its own.
    """
    return get(name)(task_vectors, **params)
