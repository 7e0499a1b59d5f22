"""The thread settings the command-line entry points apply (orthoreg.utils.threads).

The settings are process-wide and libgomp reads its wait policy once, when ``import torch``
loads it; so what libgomp ends up doing is checked in fresh interpreters started through an
entry point. libgomp reports what it runs with on stderr when ``OMP_DISPLAY_ENV=verbose``:
``GOMP_SPINCOUNT = '0'`` is the passive policy, ``'300000'`` its spinning default. Cases
that only decide the environment run in this process, with the environment restored after
them (a fresh interpreter loads torch: 20–40 s each on the busy 2-core box).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orthoreg.errors import ConfigError
from orthoreg.utils import threads

GNU_OPENMP = sys.platform.startswith("linux") and "libgomp" in Path("/proc/self/maps").read_text()
needs_libgomp = pytest.mark.skipif(not GNU_OPENMP, reason="torch is not on GNU OpenMP here")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any thread or wait setting, plus ``extra``."""
    drop = {*threads.WAIT_VARIABLES, threads.VARIABLE, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_DISPLAY_ENV": "verbose", **extra}


def python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def openmp_shown(stderr: str) -> dict[str, str]:
    """libgomp's ``OMP_DISPLAY_ENV`` block as a dict."""
    return dict(re.findall(r"^\s+([A-Z_]+) = '([^']*)'", stderr, flags=re.MULTILINE))


def after_entry(entry: str, argv: list[str], then: str = "") -> list[str]:
    """``python -c``: call ``entry.main(argv)`` — a usage error, which returns before any
    real work — then load torch (if the entry has not) and print what was left: the OpenMP
    environment and the value of the expression ``then``."""
    return ["-c", "import json, os, sys\n"
                  f"from {entry} import main\n"
                  f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                  "import torch\n"
                  "seen = {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT',"
                  " 'OMP_NUM_THREADS')}\n"
                  f"seen['then'] = {then or 'None'}\n"
                  "print(json.dumps(seen))\n"]


def left_by(entry: str, argv: list[str], then: str = "",
            **extra: str) -> tuple[dict[str, object], dict[str, str]]:
    """(the environment left by the entry point, what libgomp says it runs with)."""
    proc = python(after_entry(entry, argv, then), clean_env(**extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), openmp_shown(proc.stderr)


@needs_libgomp
def test_the_command_makes_openmp_threads_sleep_instead_of_spinning(tmp_path: Path):
    # control: the same interpreter without the entry point spins, so the check can fail
    plain = openmp_shown(python(["-c", "import torch"], clean_env()).stderr)
    assert plain["GOMP_SPINCOUNT"] not in ("", "0")
    # the real command: `python -m orthoreg info` loads torch, then fails on the missing file
    proc = python(["-m", "orthoreg", "info", str(tmp_path / "missing.safetensors")],
                  clean_env())
    assert proc.returncode == 2 and "missing.safetensors" in proc.stderr
    shown = openmp_shown(proc.stderr)
    assert (shown["OMP_WAIT_POLICY"], shown["GOMP_SPINCOUNT"]) == ("PASSIVE", "0")
    assert shown["OMP_NUM_THREADS"] == plain["OMP_NUM_THREADS"]  # the count is unchanged


@needs_libgomp
@pytest.mark.parametrize("entry, argv", [("orthoreg.cli", ["bench", "nope"]),
                                         ("orthoreg.bench.__main__", ["load", "--rounds", "0"])])
def test_both_entry_points_set_the_policy_before_torch_loads(entry: str, argv: list[str]):
    seen, shown = left_by(entry, argv)
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE"
    assert shown["GOMP_SPINCOUNT"] == "0"  # libgomp started after the setting, and read it
    assert seen["OMP_NUM_THREADS"] is None  # torch's default count


def test_importing_the_library_loads_no_torch_and_sets_nothing():
    script = ("import os, sys, orthoreg, orthoreg.cli, orthoreg.bench.__main__\n"
              "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n")
    proc = python(["-c", script], clean_env())
    assert proc.stdout.split() == ["False", "None"], proc.stderr[-2000:]


@pytest.mark.parametrize("extra, expected", [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
    ({"ORTHOREG_THREADS": "default"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}),
    ({"GOMP_SPINCOUNT": "1234"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "1234"}),
    ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}),
])
def test_the_opt_out_and_the_users_own_settings_are_respected(
        monkeypatch: pytest.MonkeyPatch, extra: dict[str, str],
        expected: dict[str, str | None]):
    # in this process torch is loaded already, so only the environment is decided here;
    # the tests above check that libgomp reads it when the entry point runs first
    for name in (*threads.WAIT_VARIABLES, threads.VARIABLE, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    settings = threads.configure_process()
    assert {k: os.environ.get(k) for k in expected} == expected
    assert "OMP_NUM_THREADS" not in os.environ and settings.threads is None
    assert settings.wait_policy == ("left alone" if extra.get(threads.VARIABLE) else
                                    "user" if extra else "too late")


def test_a_pinned_count_reaches_torch_and_every_result_records_it():
    # one more than the cores, so that it differs from torch's default on any machine
    count = threads.available_cores() + 1
    seen, _ = left_by("orthoreg.cli", ["bench", "nope"],
                   "[__import__('torch').get_num_threads(), __import__("
                   "'orthoreg.utils.provenance').utils.provenance.provenance()['torch_threads']]",
                   ORTHOREG_THREADS=str(count))
    assert seen["then"] == [count, count]
    assert seen["OMP_NUM_THREADS"] == str(count)  # for child processes


def test_a_malformed_setting_is_a_one_line_user_error():
    proc = python(["-m", "orthoreg", "merge", "--help"], clean_env(ORTHOREG_THREADS="many"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "orthoreg: error: ORTHOREG_THREADS='many': expected a positive thread count, "
        "'auto' or 'default'"]


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "x"])
def test_requested_threads_rejects_what_is_not_a_count(value: str):
    with pytest.raises(ConfigError, match="ORTHOREG_THREADS"):
        threads.requested_threads(value)


def test_requested_threads_reads_counts_auto_and_default(monkeypatch: pytest.MonkeyPatch):
    assert threads.requested_threads("3") == 3
    assert threads.requested_threads("") is None
    assert threads.requested_threads("Default") == "default"
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "other_runnable", lambda: 5.0)
    assert threads.requested_threads("auto") == 3
    monkeypatch.setattr(threads, "other_runnable", lambda: 30.0)
    assert threads.requested_threads("auto") == 1  # never fewer than one
    monkeypatch.setattr(threads, "other_runnable", lambda: None)  # no /proc/stat
    assert threads.requested_threads("auto") == 8


def test_available_cores_and_the_run_queue_are_read():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))
    if Path("/proc/stat").is_file():
        busy = threads.other_runnable(samples=3, interval=0.0)
        assert busy is not None and busy >= 0


def test_the_load_bench_summary_reports_slowdowns_paired_by_round():
    from orthoreg.bench.load import format_table, summarize

    def record(round_index: int, setting: str, condition: str, steps: float,
               images: float) -> dict[str, object]:
        return {"round": round_index, "setting": setting, "condition": condition,
                "threads": 2, "steps_per_s": steps, "images_per_s": images}

    records = [record(0, "all", "quiet", 1.0, 100.0), record(0, "all", "loaded", 0.25, 50.0),
               record(1, "all", "loaded", 0.5, 40.0), record(1, "all", "quiet", 2.0, 120.0),
               record(0, "one", "quiet", 4.0, 200.0), record(0, "one", "loaded", 2.0, 100.0),
               record(1, "one", "loaded", 2.0, 100.0), record(1, "one", "quiet", 4.0, 200.0)]
    rows = {row["setting"]: row for row in summarize(records)}
    assert rows["all"]["quiet_train"] == 1.5 and rows["all"]["loaded_train"] == 0.375
    assert rows["all"]["slowdown_train"] == 4.0  # ratio of medians
    assert rows["all"]["paired_train"] == 4.0 and rows["all"]["paired_train_range"] == [4.0, 4.0]
    assert rows["all"]["slowdown_eval"] == 110.0 / 45.0
    assert rows["one"]["slowdown_train"] == 2.0
    # against the best quiet rate of any setting (one's 4.0 steps/s)
    assert rows["all"]["vs_best_quiet_train"] == 4.0 / 0.375
    assert rows["one"]["vs_best_quiet_train"] == 2.0
    assert "all" in format_table(list(rows.values()))
