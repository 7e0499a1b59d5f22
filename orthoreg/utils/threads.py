"""CPU threading of the command-line processes: OpenMP threads that sleep when they wait,
and an intra-op thread count the user can pin.

Why. torch's CPU wheels run their intra-op pool (and MKL and oneDNN inside it) on GNU
OpenMP (libgomp, ``torch.__config__.parallel_info()``). An idle libgomp thread *spins* at
every barrier — by default ≈ 300 000 iterations before it sleeps — waiting for its
siblings. On a machine whose cores are all busy, the sibling it waits for has been
descheduled, so the spinning thread burns the time slice that sibling needed. A training
step of the quick demo's model calls ≈ 150 convolution and matrix-product kernels, each a
parallel region ending in a barrier, and every one pays.
Measured with ``orthoreg bench load`` on the shared 2-core box (docs/PERFORMANCE.md,
"Under load"): beside one more busy process, 0.03–0.05 fine-tune steps/s with the default
against 0.5–1.0 with the threads told to sleep; one more process cost the spinning pool
3.6–7.5× and the sleeping one 1.1–2.1× — the reported 48 → 668 s of ``orthoreg demo
--quick`` was the spinning.

What the entry points do (:func:`configure_process`, called by ``orthoreg …`` and
``python -m orthoreg.bench …`` before anything imports torch; importing the library does
not call it):

- ``OMP_WAIT_POLICY=PASSIVE`` in the environment, unless the user set ``OMP_WAIT_POLICY``
  or ``GOMP_SPINCOUNT``. libgomp reads it once, when ``import torch`` loads the runtime, so
  it must be in place before that; child processes inherit it. Waiting threads then sleep
  at once; the price on an idle machine, a kernel wake-up per parallel region, could not
  be measured on the shared box (docs/PERFORMANCE.md says how to check it).
- The intra-op thread count stays torch's default (one per available core) — the count
  the published figures were computed with. Float reductions are split by thread count, so
  results are bit-identical only between runs with the same count; every result file
  records it (``torch_threads`` in :func:`orthoreg.utils.provenance.provenance`).
- ``ORTHOREG_THREADS=N`` pins N intra-op threads (``torch.set_num_threads``, and
  ``OMP_NUM_THREADS`` for child processes). ``ORTHOREG_THREADS=auto`` takes the
  available cores minus the tasks already running when the command starts, for a machine
  that stays busy (on the 2-core box it ran no faster than the default beside one more
  process); the count — and so the last bits of the results — then depends on the load at
  start. ``ORTHOREG_THREADS=default`` leaves torch and OpenMP
  exactly as they would be without orthoreg.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orthoreg.errors import ConfigError

VARIABLE = "ORTHOREG_THREADS"
#: the user's own OpenMP wait settings; if either is set we do not override it
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_process` did, for logs and tests."""

    wait_policy: str  # "passive", "user", "left alone" or "too late" (torch already loaded)
    threads: int | None  # the pinned intra-op count; None: torch's default


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def other_runnable(samples: int = 9, interval: float = 0.01) -> float | None:
    """Runnable tasks besides the calling thread, system-wide: the median of ``samples``
    reads of ``procs_running`` in ``/proc/stat``, ``interval`` seconds apart.

    Instantaneous, unlike the load average, whose one-minute decay still counts a process
    that finished seconds ago (e.g. the previous command of a script). None where
    ``/proc/stat`` is not readable.
    """
    counts = []
    for index in range(samples):
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running "):
                    counts.append(int(line.split()[1]) - 1)
                    break
        except (OSError, ValueError):
            return None
        if index + 1 < samples:
            time.sleep(interval)
    return float(statistics.median(counts)) if counts else None


def free_cores() -> int:
    """Available cores minus the tasks already running on them, at least one."""
    busy = other_runnable()
    return max(1, available_cores() - round(busy or 0))


def requested_threads(value: str | None = None) -> int | str | None:
    """Parse ``ORTHOREG_THREADS``: a count, "auto" → a count, None (unset), or "default"."""
    value = os.environ.get(VARIABLE, "") if value is None else value
    value = value.strip().lower()
    if value in ("", "default"):
        return None if value == "" else "default"
    if value == "auto":
        return free_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{VARIABLE}={value!r}: expected a positive thread count, 'auto' "
                          "or 'default'")
    return count


def configure_process() -> ThreadSettings:
    """Apply the entry points' thread settings (module docstring); call before torch loads.

    Raises :class:`~orthoreg.errors.ConfigError` for a malformed ``ORTHOREG_THREADS``.
    """
    requested = requested_threads()
    if requested == "default":
        return ThreadSettings("left alone", None)
    torch_loaded = "torch" in sys.modules
    if any(name in os.environ for name in WAIT_VARIABLES):
        wait = "user"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # for this process and its children
        wait = "too late" if torch_loaded else "passive"
    threads = requested if isinstance(requested, int) else None
    if threads is not None:
        # the environment for child processes; torch itself caps OMP_NUM_THREADS at the
        # core count, so the count the user asked for is set explicitly (the wait policy
        # is in the environment by now, so loading torch here is safe)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    return ThreadSettings(wait, threads)


def torch_threads() -> int | None:
    """torch's intra-op thread count, or None when torch has not been imported."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None
