#!/usr/bin/env bash
# GPU check of the CLIP recipe, needing no weights and no data (orthoreg/clip/gpucheck.py):
# a random-init open_clip ViT-B/32, synthetic images, zero-shot heads from random text
# weights; 20 steps of each paradigm with OrthoReg in fp32 and bf16 (and without, for the
# penalty's step-time ratio), peak memory, evaluation throughput, and a 1-GPU torchrun
# with NCCL. Prints one JSON line of figures; exit 0 iff every check passed. ≈ 2 min on one
# GPU, capped at 5.
#
# usage: bash scripts/gpu_check.sh [--dry-run] [--steps N] [--batch-size B] [--out FILE] …
#   --dry-run   CPU, tiny ViT, 2 steps, gloo: checks the script itself (the CLIP tests run it)
#   PYTHON      interpreter (default: .venv-clip/bin/python, built by scripts/clip_env.sh)
#   GPU_CHECK_TIMEOUT  seconds before the check is stopped (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv-clip/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: $PY not found; build the CLIP environment first: bash scripts/clip_env.sh --setup-only" >&2
  exit 2
fi
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" -m orthoreg.clip.gpucheck "$@"
