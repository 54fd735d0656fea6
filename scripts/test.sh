#!/usr/bin/env bash
# The test command (README, and .ci/run): lint, type-check, then the whole suite.
CRCTL_EXTRAS=test
source "$(dirname "$0")/_venv.sh"
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
