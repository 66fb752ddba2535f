#!/usr/bin/env bash
# The test command: CPU unit tests, then tests/multi_gpu on gloo CPU processes under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest tests/unit -q -m "not gpu" "$@"
