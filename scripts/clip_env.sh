#!/usr/bin/env bash
# The CLIP environment (docs/CLIP.md): a separate venv, .venv-clip, with open_clip and the
# torch/torchvision pair it needs, then the CLIP tests in it.
#
# Why a separate venv: open_clip imports torchvision, and no torchvision build imports
# beside the CPU torch 2.13.0 of the main environment. torch 2.14.1 + torchvision 0.29.1
# do. Which build of that pair (scripts/lib.sh, orthoreg_torch_choice): ORTHOREG_CLIP_TORCH
# (else ORTHOREG_TORCH when it is auto, cpu or cuda) = auto (default: an NVIDIA GPU → cuda,
# else cpu; a venv that already holds the pair keeps it), cpu (torch==2.14.1+cpu
# torchvision==0.29.1+cpu from pip's find-links, else PyTorch's CPU index: ≈ 1 GB
# installed), cuda (PyPI's Linux wheels, which carry the CUDA libraries: the venv is
# ≈ 5.6 GB) or your own requirements. A constraints file then pins the installed pair so
# that nothing in the resolution (open_clip, timm, peft, the project itself) can pull
# another build.
#
# Idempotent: a stamp records what was installed; rerunning with the same pins, torch
# setting and pyproject.toml skips the install and only runs the tests.
#
# usage: bash scripts/clip_env.sh [--setup-only] [pytest args…]
#   CLIP_VENV   venv folder (default: .venv-clip in the repository root)
#   PYTHON      interpreter to create it with (default: python3.11, else python3)
#   ORTHOREG_CLIP_TORCH   auto | cpu | cuda | requirements (see above)
#   ORTHOREG_TORCH_INDEX  the index the torch step uses (pip's --index-url)
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHOREG_SCRIPT=clip_env
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
OPEN_CLIP_PIN="open_clip_torch==3.3.0"

VENV=${CLIP_VENV:-.venv-clip}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
SETUP_ONLY=0
if [ "${1:-}" = "--setup-only" ]; then
  SETUP_ONLY=1
  shift
fi
setting=${ORTHOREG_CLIP_TORCH:-}
if [ -z "$setting" ]; then
  case ${ORTHOREG_TORCH:-auto} in
    auto | cpu | cuda) setting=${ORTHOREG_TORCH:-auto} ;;
    *) setting=auto ;;  # a requirement for the main environment's torch does not fit here
  esac
fi
pair="torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
orthoreg_torch_choice "$setting" "$pair" "$TORCH_VERSION" "$TORCHVISION_VERSION"
if [[ $TORCH_REQS != *torchvision* ]]; then  # own requirements naming torch only
  TORCH_REQS+=" torchvision==$TORCHVISION_VERSION"
fi

started=$(date +%s)
stamp="$VENV/.orthoreg-clip-installed"
want="$setting: $pair $OPEN_CLIP_PIN $(sha256sum pyproject.toml | cut -c1-16)"
probe='import torch, torchvision, open_clip, orthoreg, pytest; print("torch", torch.__version__, "torchvision", torchvision.__version__, "open_clip", open_clip.__version__)'

if [ ! -x "$VENV/bin/python" ]; then
  echo "clip_env: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && versions=$("$VENV/bin/python" -c "$probe" 2>/dev/null); then
  echo "clip_env: $VENV is up to date ($versions)"
else
  # shellcheck disable=SC2086  # TORCH_CHECK is a list of requirements
  if orthoreg_satisfied "$VENV/bin/python" $TORCH_CHECK; then
    echo "clip_env: keeping $(orthoreg_installed_pins "$VENV/bin/python" torch torchvision | xargs)"
  else
    orthoreg_install_torch "$VENV/bin/python" ORTHOREG_CLIP_TORCH
  fi
  constraints="$VENV/constraints.txt"
  orthoreg_installed_pins "$VENV/bin/python" torch torchvision >"$constraints"
  echo "clip_env: installing $OPEN_CLIP_PIN and orthoreg[dev,clip] with $(xargs <"$constraints")"
  orthoreg_pip "$VENV/bin/python" install -q -c "$constraints" "$OPEN_CLIP_PIN" -e ".[dev,clip]"
  versions=$("$VENV/bin/python" -c "$probe")
  echo "$want" >"$stamp"
  echo "clip_env: installed in $(( $(date +%s) - started )) s ($versions)"
fi

if [ "$SETUP_ONLY" = 1 ]; then
  exit 0
fi
# CLIP tests must run here, never skip: ORTHOREG_REQUIRE_CLIP turns a missing open_clip
# into a failure instead of a skip (tests/clip/conftest.py)
ORTHOREG_REQUIRE_CLIP=1 "$VENV/bin/python" -m pytest -q tests/clip "$@"
