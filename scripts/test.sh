#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite: ruff, pytest (including the slow
# end-to-end `demo --quick`), then the CLIP recipe's tests in their own environment.
# Pass pytest arguments through, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check orthoreg tests examples
python3 -m pytest -q "$@"
if [ -f scripts/clip_env.sh ] && [ -z "${ORTHOREG_SKIP_CLIP:-}" ]; then
  bash scripts/clip_env.sh
fi
