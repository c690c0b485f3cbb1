#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools, torch pinned.
#   bash scripts/setup.sh            # CPU (torch 2.13.0 CPU build where available)
#   TORCH_SPEC="torch" bash scripts/setup.sh   # let pip choose torch (e.g. a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ -n "${TORCH_SPEC:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
fi
.venv/bin/python -c "import torch, diffusers, transformers, lightning, peft; print('setup ok: torch', torch.__version__)"
