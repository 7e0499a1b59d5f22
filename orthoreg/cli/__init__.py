"""``orthoreg …``: user errors print one line and exit 2; bugs show a traceback, exit 1."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from orthoreg.cli.registry import COMMANDS, UsageError
from orthoreg.errors import OrthoRegError
from orthoreg.utils.allocator import tune_allocator
from orthoreg.utils.threads import configure_process

#: modules that register subcommands (imported lazily so `orthoreg --help` stays fast)
COMMAND_MODULES = ("orthoreg.cli.commands",)
OPTIONAL_COMMAND_MODULES = ("orthoreg.cli.diagnose", "orthoreg.cli.clip")


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    for module in OPTIONAL_COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    parser = argparse.ArgumentParser(
        prog="orthoreg",
        description="OrthoReg fine-tuning and task arithmetic (Liu et al., CVPR 2026).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in sorted(COMMANDS):
        cmd = COMMANDS[name]
        child = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(child)
        child.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # first, before anything loads torch: libgomp reads its wait policy once, at load, and
    # its default spinning is what slowed the quick demo 48 → 668 s beside one busy process
    # (utils.threads; `import orthoreg.cli` itself does not load torch)
    try:
        configure_process()
    except OrthoRegError as exc:
        print(f"orthoreg: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad arguments
    tune_allocator()  # CPU loops re-fault freed activation pages otherwise (utils.allocator)
    try:
        return int(args._run(args) or 0)
    except (OrthoRegError, UsageError, OSError) as exc:
        # OSError: a path the user named is missing, a directory, not writable, or the
        # disk is full — the user's to fix, not a bug. Always one line.
        if args.debug:
            traceback.print_exc()
        print(f"orthoreg {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("orthoreg: internal error (a bug in orthoreg; please report it with the "
              "traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
