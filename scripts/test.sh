#!/usr/bin/env bash
# Lint and run the whole test suite: fast tests, slow tests and the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -m "" -q "$@"
