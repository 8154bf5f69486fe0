#!/usr/bin/env bash
# Idempotent set-up: a project virtualenv in .venv with the CPU build of torch
# installed first (a plain `torch` requirement would pull several GB of CUDA
# packages), then this project in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
echo "setup: ok ($(.venv/bin/python -c 'import torch, flwr, monai; print("torch", torch.__version__, "flwr", flwr.__version__, "monai", monai.__version__)'))"
