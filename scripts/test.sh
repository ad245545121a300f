#!/usr/bin/env bash
# Set everything up, then run the linter, the manifest check and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check fractal_tasks tests benchmarks
.venv/bin/fractal-manifest check --package fractal_tasks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
