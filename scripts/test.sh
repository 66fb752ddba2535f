#!/usr/bin/env bash
# The test command (CI runs exactly this, through .ci/run):
#   1. the one-way import contract (import-linter, [tool.importlinter] in pyproject.toml);
#   2. tests/unit: CPU only, Triton kernels in the interpreter, over one pytest-xdist worker
#      per core (MOELORA_TEST_WORKERS to change it; 0: in this process);
#   3. tests/integration: subprocesses (the launcher, the CLI under torchrun, the sweep);
#   4. tests/multi_gpu under torchrun on gloo CPU processes, worlds 2 and 4.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TRITON_INTERPRET=1  # Triton kernels run in the interpreter on CPU
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest tests/unit -q -m "not gpu" -n "${MOELORA_TEST_WORKERS:-auto}" "$@"
.venv/bin/python -m pytest tests/integration -q "$@"
# tests/multi_gpu: every process runs pytest under torchrun (gloo CPU processes, worlds 2 and 4;
# world 8 is marked slow and left out). torchrun exits non-zero if any rank's pytest fails, and
# set -e makes that the script's exit code. A dead rank cannot hang a collective past 60 s.
for world in 2 4; do
  MOELORA_DIST_BACKEND=gloo MOELORA_DIST_TIMEOUT=60 .venv/bin/torchrun --standalone \
    --nproc-per-node "$world" -m pytest tests/multi_gpu -q -m "not slow" -p no:cacheprovider
done
