#!/usr/bin/env bash
# Set everything up, then run the linter, the formatter check, the type checker,
# the import-layer contract (import-linter),
# the manifest check and the tests (arguments go to pytest). The long rounds of
# tests/test_safety.py run with FRACTAL_TASKS_LONG_TESTS=1 (as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check fractal_tasks tests benchmarks docs
.venv/bin/ruff format --check fractal_tasks tests benchmarks docs
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
.venv/bin/fractal-manifest check --package fractal_tasks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
