#!/usr/bin/env bash
# Apply's fast path writes chunk files in zarr's on-disk layout itself, so the
# package pins zarr to the tested range. This job tells early when a newer
# zarr changes that layout: it installs the package with the newest zarr on
# PyPI (past the pin, in a venv of its own) and runs the tests that compare
# our chunk files with zarr's own reads and writes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci/.venv-newest-zarr
[ -x "$venv/bin/python" ] || .venv/bin/python -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test]"
# past the pin on purpose (pip then reports a conflict with it, and installs)
"$venv/bin/python" -m pip install -q --upgrade zarr >"$venv/pip.log" 2>&1 ||
  { cat "$venv/pip.log"; exit 1; }
echo "chunk-file tests against zarr $("$venv/bin/python" -c 'import zarr; print(zarr.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_chunk_io.py tests/test_core.py
