"""``orthoreg diagnose --run DIR``: the composability diagnostics of a finished run.

Registered into the CLI by ``orthoreg.cli`` (an optional command module). The work is in
:func:`orthoreg.experiment.diagnose.diagnose_run`; this module only maps flags to options.
"""

from __future__ import annotations

import argparse

from orthoreg.cli.registry import UsageError, command

# The library's defaults, repeated so that building the parser does not import torch
# (``orthoreg --help`` stays fast); tests/diagnostics/test_cli_diagnose.py keeps them equal.
DEFAULT_POINTS = 13
DEFAULT_RANGE = 3.0
DEFAULT_EXAMPLES = 128
DEFAULT_SHARE = 0.9
OBJECTIVE_NAMES = ("true_logit", "loss")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR",
                   help="a finished run directory (orthoreg demo --out DIR)")
    p.add_argument("--seed", type=int, help="which seed's runs (default: the first)")
    p.add_argument("--paradigms", nargs="+", metavar="NAME",
                   help="paradigms to diagnose (default: all in the run)")
    p.add_argument("--grid", type=int, default=DEFAULT_POINTS, metavar="N",
                   help=f"ξ grid points per axis (default {DEFAULT_POINTS})")
    p.add_argument("--range", type=float, default=DEFAULT_RANGE, metavar="R",
                   help=f"ξ grid over [-R, R] (default {DEFAULT_RANGE:g})")
    p.add_argument("--all-pairs", action="store_true",
                   help="every pair of tasks (default: the first pair)")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, metavar="N",
                   help=f"examples per task for ξ (default {DEFAULT_EXAMPLES}); ξ costs "
                   "grid² forward passes of N images per task and variant for weight-space "
                   "paradigms, one JVP per vector and batch for linear")
    p.add_argument("--tfs-examples", type=int, default=DEFAULT_EXAMPLES, metavar="N",
                   help=f"examples per task for TFS (default {DEFAULT_EXAMPLES})")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split's inputs to probe (default test)")
    p.add_argument("--share", type=float, default=DEFAULT_SHARE,
                   help=f"TFS: share of attribution mass in I_t (default {DEFAULT_SHARE})")
    p.add_argument("--objective", default=OBJECTIVE_NAMES[0], choices=OBJECTIVE_NAMES,
                   help="TFS attribution objective ℓ (default: the true-class logit)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="diagnostics to compute: orthogonality disentanglement specialization")


@command("diagnose", "composability diagnostics of a finished run: ξ heatmaps, cosines, "
         "spectra, column angles, task-feature specialization", _configure)
def diagnose(args: argparse.Namespace) -> int:
    import torch

    from orthoreg.diagnostics.specialization import OBJECTIVES
    from orthoreg.experiment.diagnose import DiagnoseOptions, diagnose_run

    if args.objective not in OBJECTIVES:
        raise UsageError(f"unknown --objective {args.objective!r}; choose from "
                         f"{sorted(OBJECTIVES)}")
    options = DiagnoseOptions(
        seed=args.seed, paradigms=tuple(args.paradigms) if args.paradigms else None,
        points=args.grid, extent=args.range, all_pairs=args.all_pairs,
        examples=args.examples, tfs_examples=args.tfs_examples, split=args.split,
        share=args.share, objective=args.objective,
        **({"sections": tuple(args.only)} if args.only else {}),
    )
    document = diagnose_run(args.run, options)
    print(f"orthoreg diagnose: {torch.get_num_threads()} torch thread(s)")
    for paradigm, sections in document["paradigms"].items():
        for key, maps in sections.get("disentanglement", {}).items():
            for variant, result in maps.items():
                print(f"  {paradigm:8s} {variant:9s} {key.replace('|', ' × ')}: mean ξ in disk "
                      f"{result['disk_mean']:.4f}, max {result['max']:.3f} "
                      f"({result['seconds']:.1f} s)")
    print(f"wrote {args.run}/diagnostics.json, diagnostics.md, {len(document['files'])} PNGs; "
          f"report.md section updated ({document['timings']['total']:.1f} s)")
    return 0
