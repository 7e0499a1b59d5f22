#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: the embedded benchmark, in the
# project's environment (.venv, or ORTHOREG_VENV / the active venv; see scripts/setup.sh).
# Extra arguments go to `orthoreg demo` (e.g. --seeds 3, --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHOREG_SCRIPT=demo
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bash scripts/setup.sh
exec "$(orthoreg_env_python)" -m orthoreg demo "$@"
