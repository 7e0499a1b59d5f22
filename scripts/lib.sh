# shellcheck shell=bash
# Shared by scripts/setup.sh, test.sh, demo.sh and clip_env.sh (sourced, never run):
# which Python environment the project lives in, which torch build it gets, and pip
# without the machine-wide configuration's noise. Callers run under `set -euo pipefail`
# and may set ORTHOREG_SCRIPT (the name errors are prefixed with).
#
# The environment (orthoreg_env_dir), first match wins:
#   ORTHOREG_VENV=DIR   any Python environment with DIR/bin/python (a venv, a conda or pyenv
#                       prefix); created as a venv if missing. Relative paths start at the
#                       repository root.
#   VIRTUAL_ENV         the active virtual environment (`source …/bin/activate`)
#   .venv               in the repository root (the default)
#
# The torch build (orthoreg_torch_choice), from ORTHOREG_TORCH (ORTHOREG_CLIP_TORCH for the
# CLIP environment):
#   auto (default)  an NVIDIA GPU that nvidia-smi lists → cuda, else cpu; an installed torch
#                   that already meets the project's requirement is kept
#   cpu             the CPU build (torch==V+cpu): from pip's find-links when they hold it
#                   (offline), else from PyTorch's CPU index
#   cuda            PyPI's Linux build (it carries the CUDA libraries, ≈ 5 GB installed)
#   REQUIREMENT…    your own, e.g. "torch==2.14.1" (space-separated; torch/torchvision only)
# ORTHOREG_TORCH_INDEX=URL makes the torch step use that index (pip's --index-url).

# (builtins only while sourcing: the tests source this with nothing but a fake nvidia-smi on PATH)
_orthoreg_lib=${BASH_SOURCE[0]}
[[ $_orthoreg_lib == */* ]] || _orthoreg_lib=./$_orthoreg_lib
ORTHOREG_ROOT=$(cd "${_orthoreg_lib%/*}/.." && pwd)
unset _orthoreg_lib
ORTHOREG_TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# a pip note per package when a configured local index lacks that package's folder
ORTHOREG_PIP_NOISE="is ignored: it is neither a file nor a directory"

orthoreg_die() {
  echo "${ORTHOREG_SCRIPT:-orthoreg}: error: $*" >&2
  exit 1
}

# ---- the environment ----------------------------------------------------------------

orthoreg_env_dir() {
  local dir
  if [ -n "${ORTHOREG_VENV:-}" ]; then
    dir=$ORTHOREG_VENV
    case $dir in /*) ;; *) dir=$ORTHOREG_ROOT/$dir ;; esac
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    dir=$VIRTUAL_ENV
  else
    dir=$ORTHOREG_ROOT/.venv
  fi
  echo "${dir%/}"
}

# where orthoreg_env_dir's answer came from, for messages
orthoreg_env_origin() {
  if [ -n "${ORTHOREG_VENV:-}" ]; then
    echo "ORTHOREG_VENV"
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    echo "the active virtual environment (VIRTUAL_ENV)"
  else
    echo "the default"
  fi
}

# DIR/bin/python, or DIR/bin/python3 where only that exists (a system prefix such as /usr)
orthoreg_env_python() {
  local dir
  dir=$(orthoreg_env_dir)
  if [ ! -x "$dir/bin/python" ] && [ -x "$dir/bin/python3" ]; then
    echo "$dir/bin/python3"
  else
    echo "$dir/bin/python"
  fi
}

# orthoreg_python_info PYTHON → "VERSION VENV MANAGED PIP ENSUREPIP PREFIX"
#   VENV 1 inside a virtual environment; MANAGED 1 when pip would refuse to install (PEP 668:
#   an EXTERNALLY-MANAGED marker in the stdlib directory of a non-venv interpreter);
#   PIP / ENSUREPIP 1 when the module is importable. Empty output: not a working Python.
orthoreg_python_info() {
  "$1" - 2>/dev/null <<'PY' || true
import importlib.util, os, sys, sysconfig
venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
managed = not venv and os.path.isfile(marker)
has = lambda name: int(importlib.util.find_spec(name) is not None)
print("%d.%d.%d" % sys.version_info[:3], int(venv), int(managed), has("pip"),
      has("ensurepip") * has("venv"), sys.prefix)
PY
}

orthoreg_version_ok() {  # VERSION (x.y.z) → status: at least 3.11
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 11 ]; }
}

# orthoreg_base_python → the interpreter that creates a new venv: $PYTHON, else the first
# of python3, python3.13, python3.12, python3.11 that is at least 3.11
orthoreg_base_python() {
  local candidate info
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null || orthoreg_die "PYTHON=$PYTHON: no such interpreter"
    info=$(orthoreg_python_info "$PYTHON")
    [ -n "$info" ] || orthoreg_die "PYTHON=$PYTHON does not run"
    orthoreg_version_ok "${info%% *}" \
      || orthoreg_die "PYTHON=$PYTHON is Python ${info%% *}; orthoreg needs 3.11 or newer"
    command -v "$PYTHON"
    return
  fi
  for candidate in python3 python3.13 python3.12 python3.11; do
    command -v "$candidate" >/dev/null || continue
    info=$(orthoreg_python_info "$candidate")
    if [ -n "$info" ] && orthoreg_version_ok "${info%% *}"; then
      command -v "$candidate"
      return
    fi
  done
  orthoreg_die "no Python 3.11 or newer on PATH (python3 is $(python3 --version 2>&1 || echo missing));" \
    "install one (Debian/Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
}

# ---- pip -------------------------------------------------------------------------------

# orthoreg_pip PYTHON ARGS… : `PYTHON -m pip ARGS…` without the "Location … is ignored"
# notes; pip's own exit status still decides (the callers' pipefail)
orthoreg_pip() {
  local python=$1
  shift
  "$python" -m pip "$@" 2>&1 | { grep -v "$ORTHOREG_PIP_NOISE" || true; }
}

# orthoreg_satisfied PYTHON REQUIREMENT… → status 0 when every requirement is met by what is
# installed in PYTHON's environment (local labels count: torch==2.13.0+cpu is not met by
# 2.13.0+cu130). Reads package metadata only; imports nothing heavy.
orthoreg_satisfied() {
  local python=$1
  shift
  "$python" - "$@" 2>/dev/null <<'PY'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for text in sys.argv[1:]:
    try:
        requirement = Requirement(text)
        version = metadata.version(requirement.name)
    except Exception:  # unparsable (a wheel path) or not installed
        sys.exit(1)
    if not requirement.specifier.contains(version, prereleases=True):
        sys.exit(1)
PY
}

# orthoreg_installed_pins PYTHON NAME… → "NAME==VERSION" per line, the installed versions
orthoreg_installed_pins() {
  local python=$1
  shift
  "$python" - "$@" <<'PY'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    print(f"{name}=={metadata.version(name)}")
PY
}

# ---- the torch build -------------------------------------------------------------------

orthoreg_has_nvidia_gpu() {
  local listing
  listing=$(nvidia-smi -L 2>/dev/null) || return 1
  [[ $listing == *"GPU "* ]]
}

# orthoreg_torch_choice SETTING KEEP TORCH_VERSION [TORCHVISION_VERSION]
#   SETTING  auto | cpu | cuda | requirements (see the top of this file)
#   KEEP     requirement(s) an installed torch meets to be kept under auto
# Sets TORCH_KIND (cpu|cuda|custom), TORCH_REQS (what the torch step installs),
# TORCH_CHECK (what an installed torch must meet to skip that step) and TORCH_REASON.
# Pure apart from nvidia-smi (looked up on PATH).
# shellcheck disable=SC2034  # TORCH_* are read by the callers
orthoreg_torch_choice() {
  local setting=${1:-auto} keep=$2 torch=$3 vision=${4:-} label="" requirement
  local pattern='^torch(vision)?([<>=!~;@[]|$)'
  TORCH_KIND=$setting
  TORCH_REASON="asked for by the setting"
  case $setting in
    auto)
      if orthoreg_has_nvidia_gpu; then
        TORCH_KIND=cuda TORCH_REASON="auto, nvidia-smi lists an NVIDIA GPU"
      else
        TORCH_KIND=cpu TORCH_REASON="auto, no NVIDIA GPU: nvidia-smi is missing or lists none"
      fi
      ;;
    cpu | cuda) ;;
    *)
      TORCH_KIND=custom
      for requirement in $setting; do
        [[ $requirement =~ $pattern || $requirement == *torch*.whl ]] \
          || orthoreg_die "torch setting '$setting': expected auto, cpu, cuda or torch" \
            "requirements such as 'torch==$torch' (got '$requirement')"
      done
      TORCH_REQS=$setting TORCH_CHECK=$setting
      return 0
      ;;
  esac
  # PyPI's Linux wheels carry CUDA; elsewhere (macOS, Windows) PyPI's build is the CPU one
  if [ "$TORCH_KIND" = cpu ] && [[ ${OSTYPE:-linux-gnu} == linux* ]]; then
    label=+cpu
  fi
  TORCH_REQS="torch==$torch$label${vision:+ torchvision==$vision$label}"
  if [ "$setting" = auto ]; then
    TORCH_CHECK=$keep
  elif [ -n "$label" ]; then
    TORCH_CHECK=$TORCH_REQS
  else  # cuda: the version without the CPU build
    TORCH_CHECK="torch==$torch,!=$torch+cpu${vision:+ torchvision==$vision,!=$vision+cpu}"
  fi
}

# orthoreg_torch_source PYTHON → sets TORCH_INDEX_ARGS (extra pip arguments for the torch
# step) and TORCH_SOURCE (where it comes from, in words), for TORCH_KIND / TORCH_REQS.
# A CPU build comes from pip's find-links when they hold it (this check is offline and
# takes seconds), else from PyTorch's CPU index. PYTHON may lack pip (a bare interpreter
# in a dry run): then the answer waits for the venv.
orthoreg_torch_source() {
  local python=$1 report urls
  TORCH_INDEX_ARGS=()
  if [ -n "${ORTHOREG_TORCH_INDEX:-}" ]; then
    TORCH_INDEX_ARGS=(--index-url "$ORTHOREG_TORCH_INDEX")
    TORCH_SOURCE="ORTHOREG_TORCH_INDEX=$ORTHOREG_TORCH_INDEX"
    return 0
  fi
  if [ "$TORCH_KIND" != cpu ] || [[ $TORCH_REQS != *+cpu* ]]; then
    TORCH_SOURCE="pip's configured indexes"
    return 0
  fi
  if [ "$(orthoreg_python_info "$python" | cut -d' ' -f4)" != 1 ]; then
    TORCH_SOURCE="pip's find-links if they hold $TORCH_REQS, else $ORTHOREG_TORCH_CPU_INDEX"
    TORCH_SOURCE+=" (checked once the venv exists)"
    return 0
  fi
  # --dry-run --report installs nothing (and is allowed even under PEP 668)
  # shellcheck disable=SC2086
  if report=$("$python" -m pip install --dry-run --no-deps --no-index --ignore-installed \
                -q --report - $TORCH_REQS 2>/dev/null) \
     && urls=$("$python" -c 'import json, sys
print(" ".join(i["download_info"]["url"] for i in json.load(sys.stdin)["install"]))' \
                <<<"$report" 2>/dev/null); then
    TORCH_SOURCE="pip's find-links, offline ($urls)"
  else
    TORCH_INDEX_ARGS=(--extra-index-url "$ORTHOREG_TORCH_CPU_INDEX")
    TORCH_SOURCE="PyTorch's CPU index $ORTHOREG_TORCH_CPU_INDEX"
  fi
}

# orthoreg_install_torch PYTHON SETTING_NAME → installs TORCH_REQS from the source that
# orthoreg_torch_source chose; a failure says in one line what to do instead
orthoreg_install_torch() {
  local python=$1 setting_name=$2
  orthoreg_torch_source "$python"
  echo "${ORTHOREG_SCRIPT:-orthoreg}: installing $TORCH_REQS ($TORCH_KIND: $TORCH_REASON)" \
    "from $TORCH_SOURCE"
  # shellcheck disable=SC2086
  if ! orthoreg_pip "$python" install -q $TORCH_REQS "${TORCH_INDEX_ARGS[@]}"; then
    if [ "${TORCH_INDEX_ARGS[*]}" = "--extra-index-url $ORTHOREG_TORCH_CPU_INDEX" ]; then
      orthoreg_die "pip could not install $TORCH_REQS (is $ORTHOREG_TORCH_CPU_INDEX" \
        "reachable?); put the wheels in a pip find-links folder, set ORTHOREG_TORCH_INDEX to" \
        "a mirror, or set $setting_name=cuda for PyPI's CUDA build (several GB)"
    fi
    orthoreg_die "pip could not install $TORCH_REQS from $TORCH_SOURCE (see pip's message" \
      "above); $setting_name chooses the build (auto, cpu, cuda or a requirement)"
  fi
}
