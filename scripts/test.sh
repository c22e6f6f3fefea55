#!/usr/bin/env bash
# Install (if needed), run the static checks, then the whole test suite against real Ray Serve + vLLM (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint, then types (paths and per-module strictness in pyproject.toml); either failing stops the run.
.venv/bin/ruff check services tests benchmarks loadtests
.venv/bin/mypy
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
