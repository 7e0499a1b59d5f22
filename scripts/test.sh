#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check orthoreg tests
python3 -m pytest -q "$@"
