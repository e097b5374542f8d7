#!/usr/bin/env bash
# The project's test command: set up .venv (if needed), lint (ruff) and type-check (mypy) the package, then run the
# default (non-slow) tests and the doctests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check qdiff_ao tests benchmarks examples
.venv/bin/mypy qdiff_ao
export HYPOTHESIS_PROFILE=ci
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider --durations=15 --doctest-modules qdiff_ao tests
