#!/usr/bin/env bash
# Set-up from a fresh clone: a venv in .venv, the CPU torch wheel first (an unpinned torch would
# pull a multi-GB CUDA build), then this project with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import moelora_dist, torch; print("moelora_dist ready, torch", torch.__version__)'
