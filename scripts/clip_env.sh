#!/usr/bin/env bash
# The CLIP environment (docs/CLIP.md): a separate venv, .venv-clip, with open_clip and the
# torch/torchvision pair it needs, then the CLIP tests in it.
#
# Why a separate venv: open_clip imports torchvision, and no torchvision build imports
# beside the CPU torch 2.13.0 of the main environment. torch 2.14.1 + torchvision 0.29.1
# do (both lie on this machine's disk; the venv is ≈ 5.6 GB because that torch wheel
# carries the CUDA libraries). A constraints file pins torch so that nothing in the
# resolution (open_clip, timm, peft, the project itself) can pull another build.
#
# Idempotent: a stamp records what was installed; rerunning with the same pins and the
# same pyproject.toml skips the install and only runs the tests.
#
# usage: bash scripts/clip_env.sh [--setup-only] [pytest args…]
#   CLIP_VENV   venv folder (default: .venv-clip in the repository root)
#   PYTHON      interpreter to create it with (default: python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
OPEN_CLIP_PIN="open_clip_torch==3.3.0"

VENV=${CLIP_VENV:-.venv-clip}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
SETUP_ONLY=0
if [ "${1:-}" = "--setup-only" ]; then
  SETUP_ONLY=1
  shift
fi

started=$(date +%s)
stamp="$VENV/.orthoreg-clip-installed"
want="$TORCH_PIN $TORCHVISION_PIN $OPEN_CLIP_PIN $(sha256sum pyproject.toml | cut -c1-16)"
probe='import torch, torchvision, open_clip, orthoreg, pytest; print("torch", torch.__version__, "torchvision", torchvision.__version__, "open_clip", open_clip.__version__)'

# pip's output without the machine-wide index's "Location … is ignored" notes; pip's own
# exit status still decides (pipefail)
pip_install() {
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "clip_env: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && versions=$("$VENV/bin/python" -c "$probe" 2>/dev/null); then
  echo "clip_env: $VENV is up to date ($versions)"
else
  constraints="$VENV/constraints.txt"
  printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" >"$constraints"
  echo "clip_env: installing $TORCH_PIN $TORCHVISION_PIN $OPEN_CLIP_PIN and orthoreg[dev,clip]"
  pip_install -c "$constraints" "$TORCH_PIN" "$TORCHVISION_PIN"
  pip_install -c "$constraints" "$OPEN_CLIP_PIN" -e ".[dev,clip]"
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
