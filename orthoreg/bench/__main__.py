"""``python -m orthoreg.bench <name> [options]``: dispatch to a benchmark's ``main(argv)``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from orthoreg.errors import OrthoRegError
from orthoreg.utils.allocator import tune_allocator
from orthoreg.utils.threads import configure_process


def _lazy(module: str) -> Callable[[Sequence[str] | None], int]:
    """``module.main``, imported when called: the benchmarks load torch, and the thread
    settings must be in place before torch starts (orthoreg.utils.threads)."""

    def run(argv: Sequence[str] | None) -> int:
        return int(importlib.import_module(module).main(argv) or 0)

    run.__name__ = run.__qualname__ = f"{module}.main"
    return run


BENCHMARKS: dict[str, Callable[[Sequence[str] | None], int]] = {
    name: _lazy(f"orthoreg.bench.{name}") for name in ("search", "penalty", "load")}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv or [])
    if not args or args[0] not in BENCHMARKS:
        print(f"usage: python -m orthoreg.bench {{{','.join(sorted(BENCHMARKS))}}} [options]",
              file=sys.stderr)
        return 2
    try:  # as the ``orthoreg`` command does, so both entry points time the same
        configure_process()
    except OrthoRegError as exc:
        print(f"python -m orthoreg.bench: error: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    return BENCHMARKS[args[0]](args[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
