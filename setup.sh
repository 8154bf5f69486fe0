#!/usr/bin/env bash
# Idempotent set-up: a project virtualenv in .venv with the CPU build of torch
# installed first (a plain `torch` requirement would pull several GB of CUDA
# packages), then this project in editable mode with its test extras, then the
# headless Chromium the report tests render pages in and nginx, the coordinator's door
# (Debian packages, when root).
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
# Debian packages: headless Chromium renders reports in the default test suite (tests/test_report_browser.py);
# nginx is the coordinator's door (`newadj server start`, server/ops/door.py, the deployment tests)
need=""
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then need="chromium"; fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then need="$need nginx"; fi
if [ -n "$need" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null) \
      || echo "setup: could not install the Debian package(s) $need"
  else
    echo "setup: install the Debian package(s)$need (e.g. sudo apt-get install$need)"
  fi
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, flwr, monai; print("torch", torch.__version__, "flwr", flwr.__version__, "monai", monai.__version__)'))"
