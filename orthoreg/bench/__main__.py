"""``python -m orthoreg.bench <name> [options]``: dispatch to a benchmark's ``main(argv)``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from orthoreg.bench import penalty, search
from orthoreg.utils.allocator import tune_allocator

BENCHMARKS: dict[str, Callable[[Sequence[str] | None], int]] = {"search": search.main,
                                                                  "penalty": penalty.main}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv or [])
    if not args or args[0] not in BENCHMARKS:
        print(f"usage: python -m orthoreg.bench {{{','.join(sorted(BENCHMARKS))}}} [options]",
              file=sys.stderr)
        return 2
    tune_allocator()  # as the ``orthoreg`` command does, so both entry points time the same
    return BENCHMARKS[args[0]](args[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
