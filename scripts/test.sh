#!/usr/bin/env bash
# The project's test command: set up .venv (if needed), lint (ruff) and type-check (mypy) the package, then run the
# default (non-slow) tests and the doctests, one worker process per core (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check qdiff_ao tests benchmarks examples
.venv/bin/mypy qdiff_ao
export HYPOTHESIS_PROFILE=ci
# -n auto: one pytest-xdist worker per core (tests/conftest.py gives each worker its share of torch threads);
# --dist loadfile keeps each test file on one worker, so module fixtures (the distributed ranks, the quantized
# checkpoints) are built once.
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider -n auto --dist loadfile --durations=15 \
  --doctest-modules qdiff_ao tests
