#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite in the project's environment: ruff,
# pytest (including the slow end-to-end `demo --quick`), then the CLIP recipe's tests in
# their own environment (skip them with ORTHOREG_SKIP_CLIP=1).
# Pass pytest arguments through, e.g. `bash scripts/test.sh -m "not slow"`.
# The environment is the one scripts/setup.sh uses (.venv, or ORTHOREG_VENV / the active venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHOREG_SCRIPT="test"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bash scripts/setup.sh
python=$(orthoreg_env_python)
"$python" -m ruff check orthoreg tests examples
"$python" -m pytest -q "$@"
if [ -f scripts/clip_env.sh ] && [ -z "${ORTHOREG_SKIP_CLIP:-}" ]; then
  bash scripts/clip_env.sh
fi
