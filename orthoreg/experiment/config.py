"""The experiment configuration, validated field by field.

A config is nested frozen dataclasses. :func:`from_mapping` rejects unknown keys, wrong
types and out-of-range values with one-line messages that name the dotted key, so a typo
in a YAML file fails before a single step of fine-tuning is spent.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orthoreg.errors import ConfigError

PARADIGM_NAMES = ("full", "linear", "partial", "lora")


@dataclass(frozen=True)
class DataConfig:
    max_train: int = 1000
    max_val: int = 200
    max_test: int = 500
    shots: int = 5
    split_seed: int = 0
    resolution: int = 64
    max_length: int = 64  # text family: tokens per text, [CLS] and [SEP] included


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    batch_size: int = 32
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    accumulation: int = 1
    squared: bool = False
    estimator: str = "exact"
    probes: int = 8
    #: the penalty form (orthoreg.regularizer.PENALTY_FORMS): paper | shape | growth
    form: str = "paper"
    #: which weights the penalty covers (orthoreg.regularizer.MATRIX_RULES): every ≥2-D
    #: weight ("ndim>=2", conv kernels reshaped) or exactly 2-D ones ("2d", the authors' rule)
    matrices: str = "ndim>=2"


@dataclass(frozen=True)
class ParadigmConfig:
    """One paradigm's base learning rate and options (select / targets / rank / alpha)."""

    lr: float = 3e-5
    select: str | None = None
    targets: str | None = None
    rank: int = 8
    alpha: float = 8.0


@dataclass(frozen=True)
class SelectionConfig:
    """Equal tuning budgets: OrthoReg's λ grid and the baseline's learning-rate grid.

    The baseline tries ``lr × m`` for each multiplier, OrthoReg tries each λ at the base
    lr; both grids have the same size, and both pick on the validation splits by mean
    absolute task-addition accuracy (normalized accuracy would reward weak fine-tuning).
    """

    lambdas: tuple[float, ...] = (1.0, 10.0)
    lr_multipliers: tuple[float, ...] = (1.0, 3.0)
    on_seed: str = "first"  # choose on the first seed, reuse for the others
    #: further penalty forms, each a variant of its own with its own λ grid (as large as
    #: the others: equal budgets); e.g. {shape: [0.01, 0.1], growth: [1, 10]}. The
    #: variant "orthoreg" is always the paper's form with ``lambdas``.
    forms: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class AlphaGrid:
    start: float = 0.0
    stop: float = 1.0
    num: int = 21

    def values(self) -> list[float]:
        if self.num == 1:
            return [self.start]
        step = (self.stop - self.start) / (self.num - 1)
        return [round(self.start + i * step, 10) for i in range(self.num)]


@dataclass(frozen=True)
class MechanismConfig:
    """What separates structure from magnitude (README, "What OrthoReg does, measured").

    ``norm_matched``: task addition again after rescaling every task vector to the norm of
    the baseline's vector of the same task, paradigm and seed, so a variant cannot win by
    being longer. ``xi``: the disentanglement error ξ (Ortiz-Jiménez et al. 2023) of every
    pair of task vectors on a ``xi_points``² grid over [−``xi_extent``, ``xi_extent``]² with
    ``xi_examples`` validation inputs per task, raw and (with ``norm_matched``) rescaled.
    """

    norm_matched: bool = False
    xi: bool = False
    xi_points: int = 5
    xi_extent: float = 1.0
    xi_examples: int = 48


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "embedded"
    model: str = "mobilenet_v2"
    tasks: tuple[str, ...] = ("mnist", "fashion_mnist", "animal_mnist", "digits")
    control: str | None = None
    paradigms: dict[str, ParadigmConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    alphas: AlphaGrid = field(default_factory=AlphaGrid)
    negation_thresholds: tuple[float, ...] = (0.95, 0.90, 0.80)
    merge: str = "task_arithmetic"
    #: further merge methods whose task addition is reported for the chosen candidates
    #: (selection always uses ``merge``); each is searched on its own reference α grid
    merges: tuple[str, ...] = ()
    mechanism: MechanismConfig = field(default_factory=MechanismConfig)
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- validation
class _Rule(typing.NamedTuple):
    """A range rule: the predicate and the words the error message states when it fails.

    Kept in one entry so that no rule can be added without its message (a separate text
    table had gaps, and the gaps said only "expected a valid value").
    """

    test: Callable[[Any], bool]
    text: str


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _in(low: float, high: float, x: Any, low_open: bool, high_open: bool) -> bool:
    return (low < x if low_open else low <= x) and (x < high if high_open else x <= high)


def _at_least(low: float, what: str = "an integer") -> _Rule:
    return _Rule(lambda v: v >= low, f"{what} ≥ {low:g}")


def _above(low: float, what: str = "a number") -> _Rule:
    return _Rule(lambda v: v > low, f"{what} > {low:g}")


def _within(low: float, high: float, what: str, *, low_open: bool = False,
            high_open: bool = False) -> _Rule:
    return _Rule(lambda v: _in(low, high, v, low_open, high_open),
                 f"{what} in {_interval(low, high, low_open, high_open)}")


def _list_within(low: float, high: float, what: str, *, low_open: bool = False,
                 high_open: bool = False) -> _Rule:
    return _Rule(lambda v: len(v) >= 1 and all(_in(low, high, x, low_open, high_open) for x in v),
                 f"a non-empty list of {what} in {_interval(low, high, low_open, high_open)}")


def _one_of(*choices: str) -> _Rule:
    return _Rule(lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


_RANGES: dict[str, _Rule] = {
    "data.max_train": _at_least(8), "data.max_val": _at_least(1),
    "data.max_test": _at_least(1), "data.shots": _at_least(1),
    "data.resolution": _within(16, 1024, "an integer"),
    "data.max_length": _within(4, 4096, "an integer"),
    "train.steps": _at_least(1), "train.batch_size": _at_least(1),
    "train.warmup_steps": _at_least(0), "train.weight_decay": _at_least(0, "a number"),
    "train.grad_clip": _above(0),
    "train.label_smoothing": _within(0, 1, "a number", high_open=True),
    "train.accumulation": _at_least(1), "train.probes": _at_least(1),
    "train.estimator": _one_of("exact", "hutchinson"),
    "train.form": _one_of("paper", "shape", "growth"),
    "train.matrices": _one_of("ndim>=2", "2d"),
    "selection.lambdas": _list_within(0, 1e4, "λ values", low_open=True),
    "selection.lr_multipliers": _list_within(0, 100, "multipliers", low_open=True),
    "selection.on_seed": _one_of("first", "each"),
    "selection.forms": _Rule(lambda v: all(len(g) >= 1 and all(0 < x <= 1e4 for x in g)
                                           for g in v.values()),
                             "a mapping of form names to non-empty λ lists in (0, 10000]"),
    "mechanism.xi_points": _within(2, 41, "an integer"),
    "mechanism.xi_extent": _within(0, 10, "a number", low_open=True),
    "mechanism.xi_examples": _at_least(1),
    "alphas.num": _within(1, 201, "an integer"),
    "alphas.start": _within(-10, 10, "a number"), "alphas.stop": _within(-10, 10, "a number"),
    "negation_thresholds": _list_within(0, 1, "fractions", low_open=True),
    "tasks": _Rule(lambda v: len(v) >= 1 and len(set(v)) == len(v),
                   "a non-empty list without repeats"),
    "seeds": _Rule(lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(s >= 0 for s in v),
                   "a non-empty list of distinct integers ≥ 0"),
    "paradigms.*.lr": _within(0, 1, "a number", low_open=True, high_open=True),
    "paradigms.*.rank": _at_least(1), "paradigms.*.alpha": _above(0),
}


def _printable(key: Any) -> str:
    """A key as text for a one-line message: control characters (newlines) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(key))


def _check_range(key: str, value: Any) -> None:
    generic = "paradigms.*." + key.rsplit(".", 1)[-1] if key.startswith("paradigms.") else key
    rule = _RANGES.get(key) or _RANGES.get(generic)
    if rule is not None and not rule.test(value):
        raise ConfigError(f"config key '{key}': {value!r} is out of range (expected "
                          f"{rule.text})")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__}")
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(f"{key}.{_printable(k)}", args[1], v if v is not None else {})
                for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"config key '{key}': {value} is too large") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}': {value!r} is not finite")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{_printable(unknown[0])}' "
                          f"(known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        values[name] = _coerce(key, hints[name], value)
        _check_range(key, values[name])
    return cls(**values)


def from_mapping(raw: Mapping[str, Any] | None) -> ExperimentConfig:
    """Validate a raw mapping (e.g. parsed YAML) into an :class:`ExperimentConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    config = _build(ExperimentConfig, raw)
    unknown = [p for p in config.paradigms if p not in PARADIGM_NAMES]
    if unknown:
        raise ConfigError(f"config key 'paradigms.{_printable(unknown[0])}': unknown paradigm "
                          f"(choose from {', '.join(PARADIGM_NAMES)})")
    if not config.paradigms:
        raise ConfigError("config key 'paradigms': at least one paradigm is needed")
    if config.alphas.stop < config.alphas.start:
        raise ConfigError("config key 'alphas.stop': must be ≥ alphas.start")
    if config.selection.on_seed == "first" and len(config.selection.lambdas) != len(
            config.selection.lr_multipliers):
        raise ConfigError("config key 'selection.lr_multipliers': the baseline's grid must be "
                          "as large as the λ grid (equal tuning budgets)")
    _check_forms(config)
    if config.train.batch_size > config.data.max_train:
        raise ConfigError(f"config key 'train.batch_size': {config.train.batch_size} is larger "
                          f"than data.max_train = {config.data.max_train} (one batch must fit "
                          "in the training split)")
    _check_names(config)
    return config


def _check_forms(config: ExperimentConfig) -> None:
    """Extra penalty forms: known, not the paper's own variant, and an equal tuning budget."""
    from orthoreg.regularizer import PENALTY_FORMS

    for form, grid in config.selection.forms.items():
        key = f"selection.forms.{_printable(form)}"
        if form not in PENALTY_FORMS or form == config.train.form:
            extra = sorted(set(PENALTY_FORMS) - {config.train.form})
            raise ConfigError(f"config key '{key}': unknown penalty form {form!r} (choose from "
                              f"{', '.join(extra)}; train.form = {config.train.form!r} is the "
                              "'orthoreg' variant, with selection.lambdas)")
        if config.selection.on_seed == "first" and len(grid) != len(config.selection.lambdas):
            raise ConfigError(f"config key '{key}': its λ grid must be as large as "
                              "selection.lambdas (equal tuning budgets)")
    from orthoreg.merging import available

    for index, method in enumerate(config.merges):
        _known(f"merges[{index}]", method, available(), "merge method")


def _known(key: str, value: str, known: Any, what: str) -> None:
    if value not in known:
        raise ConfigError(f"config key '{key}': unknown {what} {value!r} "
                          f"(known: {', '.join(sorted(known))})")


def _check_names(config: ExperimentConfig) -> None:
    """Names must exist in their registries now, not when the run first needs them."""
    import torch

    from orthoreg.merging import available
    from orthoreg.zoo.registry import all_models, family_of

    _known("model", config.model, all_models(), "model")
    tasks = family_of(config.model).tasks()
    for index, task in enumerate(config.tasks):
        _known(f"tasks[{index}]", task, tasks, "task")
    if config.control is not None:
        _known("control", config.control, tasks, "task")
        if config.control in config.tasks:
            raise ConfigError(f"config key 'control': {config.control!r} is also a fine-tuning "
                              "task (the control must be a task no vector was trained on)")
    _known("merge", config.merge, available(), "merge method")
    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key 'device': {config.device!r} is not a device "
                          "(e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (
            device.index is None or device.index < torch.cuda.device_count())):
        raise ConfigError(f"config key 'device': {config.device!r} is not available here")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config; ``overrides`` (dotted keys) are applied before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (is it a YAML config?)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return from_mapping(apply_overrides(raw, overrides or {}))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[leaf] = value
    return out
