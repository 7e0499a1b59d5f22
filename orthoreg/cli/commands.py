"""The core subcommands: demo/run, fetch, merge, info, bench."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from orthoreg.cli.registry import UsageError, command
from orthoreg.errors import ConfigError


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def builtin_config(name: str) -> Path:
    path = resources.files("orthoreg") / "configs" / f"{name}.yaml"
    return Path(str(path))


#: built-in configs whose quick variant predates the ``<name>.quick.yaml`` convention
QUICK_ALIASES = {"embedded": "quick"}


def resolve_config(name_or_path: str | None) -> Path:
    """``--config``: a YAML path, or the name of a built-in config (``embedded``, ``text``)."""
    if name_or_path is None:
        return builtin_config("embedded")
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path  # a path (load_config names it if it is missing)
    builtin = builtin_config(name_or_path)
    if builtin.is_file():
        return builtin
    known = sorted(p.stem for p in builtin.parent.glob("*.yaml") if "." not in p.stem)
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a built-in config "
                      f"(built-in: {', '.join(known)})")


def quick_variant(path: Path) -> Path:
    """The reduced CI version of config ``path``: ``<stem>.quick.yaml`` beside it.

    Its keys are merged over the full config (mappings key by key, everything else
    replaced), so a quick file holds only what it reduces and follows the full config
    otherwise. (``embedded``'s is ``quick.yaml``, a complete config, which merges the same.)
    """
    alias = QUICK_ALIASES.get(path.stem)
    candidates = [path.with_name(f"{path.stem}.quick.yaml")]
    if alias is not None and path.parent == builtin_config(path.stem).parent:
        candidates.append(path.with_name(f"{alias}.yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(f"--quick: config {path} has no quick variant (create "
                     f"{candidates[0].name} beside it with the keys to reduce)")


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; unreadable or malformed files are one-line errors."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (is it a YAML config?)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return raw


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: nested mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a built-in config name (embedded, text) or a YAML path "
                   "(default: the built-in embedded benchmark)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--seeds", type=int, help="repeat with seeds 0..N-1, report mean ± std")
    p.add_argument("--quick", action="store_true",
                   help="the config's reduced CI version (<config>.quick.yaml, ≤ 3 min)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=50")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--selection-from", metavar="RESULTS",
                   help="reuse the candidates a finished run of the same config chose (its "
                        "results.json or run directory) instead of searching: further seeds "
                        "elsewhere, joined later with `orthoreg combine`")


@command("demo", "run the embedded benchmark (or --config) end to end and write a report",
         _configure_demo)
def demo(args: argparse.Namespace) -> int:
    from orthoreg.experiment import Experiment, load_config
    from orthoreg.experiment.config import apply_overrides, from_mapping

    path = resolve_config(args.config)
    overrides = _overrides(args.set)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError("--seeds must be ≥ 1")
        overrides["seeds"] = list(range(args.seeds))
    if args.quick:
        quick = quick_variant(path)
        raw = merge_config(_read_mapping(path), _read_mapping(quick))
        config = from_mapping(apply_overrides(raw, overrides))
        shown = f"{path} + {quick.name}"
    else:
        config = load_config(path, overrides)
        shown = str(path)
    print(f"orthoreg demo: config {shown} → {args.out}")
    pinned = None
    if args.selection_from:
        from orthoreg.experiment.combine import load_results

        pinned = load_results(args.selection_from)[1]
    results = Experiment(config, args.out, progress=not args.no_progress, pinned=pinned).run()
    from orthoreg.experiment.report import summary_table

    print(summary_table(results))
    print(f"\nwrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'} "
          f"({results['timings']['total']:.0f} s)")
    return 0


def _configure_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="where the joined results.json and report go")
    p.add_argument("runs", nargs="+", help="finished runs (directories or results.json files)")
    p.add_argument("--name", help="the joined benchmark's name (default: the first run's)")


@command("combine", "join finished runs of one benchmark split by seed or paradigm "
         "(checked to be parts of the same benchmark) into one report", _configure_combine)
def combine(args: argparse.Namespace) -> int:
    from orthoreg.experiment.combine import combine as combine_runs

    results = combine_runs(args.out, args.runs, name=args.name)
    seeds = sorted({r["seed"] for r in results["runs"]})
    print(f"orthoreg combine: {len(args.runs)} runs, {len(results['runs'])} measurements, "
          f"seeds {seeds} → {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'}")
    return 0


def _configure_gather(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the output directory to gather into (created if missing)")
    p.add_argument("sources", nargs="+", help="output directories whose finished stages to add")


@command("gather", "merge the finished stages of several run directories into one (then "
         "`orthoreg demo --out OUT` on the whole config reuses them)", _configure_gather)
def gather(args: argparse.Namespace) -> int:
    from orthoreg.experiment.workspace import gather as gather_stages

    report = gather_stages(args.out, args.sources)
    print(f"orthoreg gather: {report.added} stages added, {report.present} already in "
          f"{args.out}, {report.unfinished} unfinished skipped")
    return 0


def _configure_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="assets to fetch (default: all default assets)")


@command("fetch", "download and verify the embedded models and datasets (sha256)",
         _configure_fetch)
def fetch(args: argparse.Namespace) -> int:
    from orthoreg.zoo import assets

    unknown = [name for name in args.names if name not in assets.registry()]
    if unknown:
        raise UsageError(f"unknown asset {unknown[0]!r}; known: {', '.join(assets.registry())}")
    assets.fetch(args.names or None)
    return 0


def _merge_parameters_help() -> tuple[str, str]:
    """The ``--param`` help and the list of methods, both read from the merge registry.

    Written out by hand, the example drifted from the code (``k=0.2``, which no method
    accepts); built from each method's defaults and constraints it stays true.
    """
    from orthoreg import merging

    methods = [merging.get(name) for name in merging.available()]
    example = next(((method.name, key, value) for method in methods
                    for key, value in method.defaults.items() if value is not None), None)
    param_help = "a hyper-parameter of the method (repeatable)"
    if example is not None:
        name, key, value = example
        param_help += f", e.g. --param {key}={value!r} for {name}"
    lines = ["merge methods and the --param KEY each accepts (default, valid values):"]
    for method in methods:
        lines.append(f"  {method.name}" + ("" if method.constraints else ": no parameters"))
        lines += [f"      {key}={method.defaults[key]!r}: {constraint.description}"
                  for key, constraint in method.constraints.items()]
    return param_help, "\n".join(lines)


def _configure_merge(p: argparse.ArgumentParser) -> None:
    param_help, methods = _merge_parameters_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep one method per line
    p.epilog = methods
    p.add_argument("method", help="merge method (see `orthoreg merge list` and below)")
    p.add_argument("vectors", nargs="*", help="task vector files (.safetensors)")
    p.add_argument("--out", help="where to write the merged task vector")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help=param_help)


@command("merge", "merge task vectors with a registered method", _configure_merge)
def merge(args: argparse.Namespace) -> int:
    from orthoreg import merging
    from orthoreg.taskvector import TaskVector

    if args.method == "list":
        for name in merging.available():
            print(name)
        return 0
    if not args.vectors or not args.out:
        raise UsageError("merge needs task vector files and --out")
    params = _overrides(args.param)
    try:  # method name and hyper-parameters first: fail before reading any vector
        merging.get(args.method).resolve(params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    vectors = [TaskVector.load(path) for path in args.vectors]
    merged = merging.merge(args.method, vectors, **params)
    merged.metadata["merge"] = {"method": args.method, "params": params,
                                "inputs": args.vectors}
    merged.save(args.out)
    print(f"wrote {args.out}: {merged}")
    return 0


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("vectors", nargs="+", help="task vector files")
    p.add_argument("--by-parameter", type=int, default=0, metavar="N",
                   help="also the N tensors carrying most of Σ‖τ‖² and of the pairwise dot "
                        "products (where the size and the alignment live; ≥ 2 vectors)")


@command("info", "describe task vectors: metadata, norms, pairwise cosines", _configure_info)
def info(args: argparse.Namespace) -> int:
    from orthoreg.taskvector import TaskVector, check_all_compatible

    # load and check every input, and compute every figure, before printing a line: a
    # mismatch in the last file must not leave half a report above its error
    vectors = [TaskVector.load(path) for path in args.vectors]
    if len(vectors) > 1:
        check_all_compatible(vectors)
    lines = []
    for path, vector in zip(args.vectors, vectors):
        meta = {k: v for k, v in vector.metadata.items() if k not in ("versions", "config")}
        lines.append(f"{path}: {len(vector)} tensors, ‖τ‖ = {vector.norm():.4g}")
        lines.append("  " + json.dumps(meta, default=str))
    if len(vectors) > 1:
        lines.append("pairwise cosine:")
        lines += ["  " + " ".join(f"{a.cosine(b):+.3f}" for b in vectors) for a in vectors]
    if args.by_parameter > 0:
        if len(vectors) < 2:
            raise UsageError("--by-parameter needs at least 2 task vectors")
        lines += _by_parameter_lines(vectors, args.by_parameter)
    print("\n".join(lines))
    return 0


def _by_parameter_lines(vectors: list[Any], top: int) -> list[str]:
    from orthoreg.diagnostics.orthogonality import alignment_by_parameter

    shares = alignment_by_parameter(vectors)
    width = max(len(name) for name in shares)
    lines = []
    for key, title in (("norm_share", "share of Σ‖τ‖²"), ("dot_share", "share of Σ pairwise dot")):
        lines.append(f"tensors by {title} (with that tensor's mean pairwise cosine):")
        for name in sorted(shares, key=lambda n: -abs(shares[n][key]))[:top]:
            lines.append(f"  {name:<{width}}  {shares[name][key]:+.3f}  "
                         f"cos {shares[name]['cosine']:+.3f}")
    return lines


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name: search | penalty")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")


@command("bench", "run a performance benchmark (prints ratios measured in one run)",
         _configure_bench)
def bench(args: argparse.Namespace) -> int:
    from orthoreg.bench.__main__ import BENCHMARKS

    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r}; choose from {sorted(BENCHMARKS)}")
    return int(BENCHMARKS[args.name](args.rest) or 0)
