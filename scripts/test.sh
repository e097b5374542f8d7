#!/usr/bin/env bash
# The project's test command: set up .venv (if needed), then run the default (non-slow) tests and the doctests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HYPOTHESIS_PROFILE=ci
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider --doctest-modules qdiff_ao tests
