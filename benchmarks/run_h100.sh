#!/usr/bin/env bash
# One device run on nvidia-h100-x1 (fits the tool's 600 s limit): the GPU kernel tests, the
# kernel benchmark (Qwen3-30B-A3B and Mixtral shapes, transformers peer, per-stage times) and
# the end-to-end decode benchmark. Everything lands under $OUT: run.log (all output),
# gpu_tests.log, kernels_*.csv/.png, e2e_decode_*.csv/.png.
#   bash benchmarks/run_h100.sh               (from the repository root)
#   QUICK=1 bash benchmarks/run_h100.sh       (kernel benchmark at T in {8, 64, 4096} only)
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOG=$OUT/run.log
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
step "GPU kernel tests"
timeout 150 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rf \
  >"$OUT/gpu_tests.log" 2>&1; echo "rc=$?" | tee -a "$LOG"; tail -3 "$OUT/gpu_tests.log" | tee -a "$LOG"
step "kernel benchmark"
timeout ${KERNEL_TIMEOUT:-240} python3 benchmarks/kernels/bench_moe_lora.py --out "$OUT" --stages \
  ${QUICK:+--quick} >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "e2e decode benchmark"
timeout ${E2E_TIMEOUT:-150} python3 benchmarks/e2e/bench_decode.py --out-dir "$OUT" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step done
