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
for _ in range(3):  # warm-up: the first allocation of each size faults in any case
    torch.ones(4 * 2**20)
before = faults()
for _ in range(20):  # 16 MiB, freed and allocated again, as activations are every batch
    torch.ones(4 * 2**20)
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
    # 20 × 16 MiB re-touched: ≈ 80 k faults of 4 KiB without the settings, ~0 with them
    assert plain["faults"] > 20_000
    assert tuned["faults"] < plain["faults"] / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_user_choices_and_the_opt_out_are_respected():
    import os

    for extra in ({"ORTHOREG_MALLOC": "default"}, {"MALLOC_TOP_PAD_": "0"}):
        assert not probe("tune", {**os.environ, **extra})["applied"]
