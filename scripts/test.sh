#!/usr/bin/env bash
# The test suite: lint, then pytest (with doctests of the package). Creates the environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
exec .venv/bin/python -m pytest --doctest-modules src/dopq tests "$@"
