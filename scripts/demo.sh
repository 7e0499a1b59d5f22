#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: the embedded benchmark.
# Extra arguments go to `orthoreg demo` (e.g. --seeds 3, --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m orthoreg demo "$@"
