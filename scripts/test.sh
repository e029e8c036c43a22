#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy), then the tests. What .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check src tests benchmarks
"$PY" -m mypy
"$PY" -m pytest -q "$@"
