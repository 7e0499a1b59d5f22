"""The allocator settings the command-line entry points apply (orthoreg.utils.allocator).

Each case runs in a fresh interpreter: the settings are process-wide and must not leak
into the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from orthoreg.utils.allocator import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tune" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():  # a batch's activations: several live blocks of 4-32 MiB, then all freed
    live = [torch.ones(n * 2**18) for n in (24, 8, 16, 4, 32, 12)]
    return sum(float(t[0]) for t in live)
for _ in range(3):  # warm-up: the first allocations fault in any case
    batch()
before = faults()
for _ in range(20):
    batch()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting_them_in_again():
    plain, tuned = probe("plain"), probe("tune")
    assert tuned["applied"]
    # 20 batches of 96 MiB re-touched: ≈ 490 k faults of 4 KiB without the settings on
    # the development box, ≈ 5 k with them
    if plain["faults"] < 100_000:
        pytest.skip(f"this allocator re-faults little on its own ({plain['faults']} faults)")
    assert tuned["faults"] < plain["faults"] / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_user_choices_and_the_opt_out_are_respected():
    import os

    for extra in ({"ORTHOREG_MALLOC": "default"}, {"MALLOC_TOP_PAD_": "0"}):
        assert not probe("tune", {**os.environ, **extra})["applied"]
