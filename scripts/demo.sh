#!/usr/bin/env bash
# Set everything up, then register a synthetic plate with known shifts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m fractal_tasks.tools.demo --out demo-output "$@"
