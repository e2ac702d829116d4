#!/usr/bin/env bash
# The main job: edit a few CounterFact facts into the default model (SmolLM2-135M), before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlsedit demo "$@"
