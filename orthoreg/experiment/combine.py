"""Join finished runs of one benchmark, split by seed or by paradigm, into one report.

Why: a benchmark's seeds may not fit one machine session (the text benchmark's three seeds
take longer than a session here, and each session starts on a fresh machine without the
stage cache). Seed 0 chooses the candidates; later seeds run with ``orthoreg demo
--selection-from <seed 0>/results.json --set seeds=[1,2]`` anywhere; ``orthoreg combine``
then checks that the runs are parts of the same benchmark and writes the joined
``results.json`` and report, with mean ± std and paired differences over all seeds.

Checks, each a one-line error naming the file: same model, family, tasks, control and
config (apart from ``seeds``, ``paradigms`` and ``name``); the same options where two runs
share a paradigm; the same choice per paradigm and variant; equal pretrained accuracies
(same data and model); no (paradigm, variant, seed) measured twice. Only JSON is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orthoreg.errors import OrthoRegError
from orthoreg.utils.io import atomic_write_json

_SAME = ("model", "family", "tasks", "control")
_FREE_CONFIG_KEYS = ("seeds", "paradigms", "name")


def load_results(source: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(source)
    if path.is_dir():
        path = path / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrthoRegError(f"{path}: no such file (a finished run's results.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OrthoRegError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise OrthoRegError(f"{path}: not an orthoreg results.json (no 'runs')")
    return path, results


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def _selection_key(choice: Mapping[str, Any]) -> tuple[float, float, str]:
    return (float(choice["lr"]), float(choice["lambda"]), choice.get("form", "paper"))


def combine(out: str | Path, sources: list[str | Path], name: str | None = None) -> dict[str, Any]:
    """Check and join the runs; write ``out/results.json`` and ``out/report.md``.

    ``name``: the joined benchmark's name (default: the first run's; runs split by
    paradigm carry per-part names such as ``text-full``)."""
    from orthoreg.experiment.pipeline import summarize
    from orthoreg.experiment.report import write_report
    from orthoreg.experiment.workspace import Workspace

    if not sources:
        raise OrthoRegError("combine needs at least one run")
    loaded = [load_results(s) for s in sources]
    ref_path, ref = loaded[0]
    config = {k: v for k, v in ref["config"].items() if k not in _FREE_CONFIG_KEYS}
    paradigms: dict[str, Any] = dict(ref["config"].get("paradigms", {}))
    selection: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str, int], Path] = {}
    runs: list[dict[str, Any]] = []
    for path, results in loaded:
        for key in _SAME:
            if results.get(key) != ref.get(key):
                raise OrthoRegError(f"{path}: '{key}' is {results.get(key)!r}, {ref_path} has "
                                    f"{ref.get(key)!r}; not the same benchmark")
        other = {k: v for k, v in results["config"].items() if k not in _FREE_CONFIG_KEYS}
        differs = _first_difference(other, config)
        if differs is not None:
            raise OrthoRegError(f"{path}: config key '{differs}' differs from {ref_path}")
        for paradigm, options in results["config"].get("paradigms", {}).items():
            if paradigm in paradigms and paradigms[paradigm] != options:
                raise OrthoRegError(f"{path}: config key 'paradigms.{paradigm}' differs from "
                                    "another run's")
            paradigms[paradigm] = options
        for task, acc in results["pretrained"].items():
            if ref["pretrained"].get(task, acc) != acc:
                raise OrthoRegError(f"{path}: pretrained accuracy of {task!r} differs from "
                                    f"{ref_path} (different data or model)")
        for paradigm, variants in results["selection"].items():
            for variant, choice in variants.items():
                known = selection.setdefault(paradigm, {}).get(variant)
                if known is None or ("pinned_from" in known and "pinned_from" not in choice):
                    selection[paradigm][variant] = choice  # prefer the run that chose
                elif _selection_key(known) != _selection_key(choice):
                    raise OrthoRegError(f"{path}: chose {_selection_key(choice)} for {paradigm} /"
                                        f" {variant}, another run {_selection_key(known)}")
        for run in results["runs"]:
            key = (run["paradigm"], run["variant"], int(run["seed"]))
            if key in seen:
                raise OrthoRegError(f"{path}: {key[0]} / {key[1]} seed {key[2]} is also in "
                                    f"{seen[key]}; combine each measurement once")
            seen[key] = path
            runs.append(run)
    order = {p: i for i, p in enumerate(paradigms)}
    variant_order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs))}
    runs.sort(key=lambda r: (order.get(r["paradigm"], len(order)), variant_order[r["variant"]],
                             r["seed"]))
    seeds = sorted({r["seed"] for r in runs})
    commits = list(dict.fromkeys(str(r.get("git_commit")) for _, r in loaded))
    combined = {
        "name": name or ref["name"], "model": ref["model"], "family": ref.get("family"),
        "tasks": ref["tasks"], "control": ref["control"], "pretrained": ref["pretrained"],
        "data_info": ref.get("data_info", {}), "selection": selection, "runs": runs,
        "summary": summarize(runs),
        "sources": [{"path": str(path), "name": r.get("name"), "git_commit": r.get("git_commit"),
                     "torch_threads": r.get("torch_threads"), "versions": r.get("versions"),
                     "seeds": sorted({x["seed"] for x in r["runs"]}),
                     "paradigms": list(r["config"].get("paradigms", {})),
                     "seconds": r.get("timings", {}).get("total")} for path, r in loaded],
        "timings": {"total": sum(r.get("timings", {}).get("total", 0.0) for _, r in loaded)},
        "config": {**ref["config"], "paradigms": paradigms, "seeds": seeds,
                   "name": name or ref["config"].get("name", ref["name"])},
        "git_commit": commits[0] if len(commits) == 1 else " + ".join(commits),
        "versions": ref.get("versions"),
    }
    with Workspace(out) as ws:
        atomic_write_json(ws.root / "results.json", combined)
        write_report(ws.root, combined)
    return combined
