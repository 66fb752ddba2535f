#!/usr/bin/env bash
# The test command: CPU unit tests, then tests/multi_gpu on gloo CPU processes under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TRITON_INTERPRET=1  # Triton kernels run in the interpreter on CPU
.venv/bin/python -m pytest tests/unit -q -m "not gpu" "$@"
