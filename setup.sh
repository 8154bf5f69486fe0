#!/usr/bin/env bash
# Idempotent set-up: a project virtualenv in .venv with the CPU build of torch
# installed first (a plain `torch` requirement would pull several GB of CUDA
# packages), then this project in editable mode with its test extras, then the
# headless Chromium the report tests render pages in (Debian package, when root).
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
# the default test suite renders reports in headless Chromium (tests/test_report_browser.py)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install Debian package 'chromium' (needed by tests/test_report_browser.py)"
  else
    echo "setup: install the package 'chromium' (e.g. sudo apt-get install chromium) for tests/test_report_browser.py"
  fi
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, flwr, monai; print("torch", torch.__version__, "flwr", flwr.__version__, "monai", monai.__version__)'))"
