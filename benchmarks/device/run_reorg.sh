#!/usr/bin/env bash
# One device run (nvidia-h200, < 10 min) for the isolation + reorganization change:
#   1. tests/gpu on the current tree (kernels, decode graphs, isolation), bf16 Triton;
#   2. host time per eager MoE layer, the tree before the change (.before/, made by
#      `git archive 31adc40 moelora_dist benchmarks/kernels tests/gpu | tar -x -C .before`)
#      and the current one, side by side in one run;
#   3. the kernel benchmark (--quick, no peer) of both trees;
#   4. the 4-layer decode benchmark (B = 1, 64) of the current tree.
# Everything lands under $OUT (run.log, gpu_tests.log, layer_host.jsonl, kernels_*.csv,
# before/kernels_*.csv, e2e_decode_*.csv).
#   bash benchmarks/device/run_reorg.sh        (from the repository root; needs .before/)
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT/before"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOELORA_GIT_COMMIT=${MOELORA_GIT_COMMIT:-unknown}
LOG=$OUT/run.log
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
step "GPU tests (current tree)"
PYTHONPATH=$PWD timeout 200 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rf -x \
  >"$OUT/gpu_tests.log" 2>&1; echo "rc=$?" | tee -a "$LOG"; tail -4 "$OUT/gpu_tests.log" | tee -a "$LOG"
step "host time per eager layer: before, then current"
PYTHONPATH=$PWD/.before timeout 60 python3 benchmarks/kernels/bench_layer_host.py --out "$OUT" \
  --label before >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
PYTHONPATH=$PWD timeout 60 python3 -m benchmarks.kernels.bench_layer_host --out "$OUT" \
  --label current >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "kernel benchmark, current tree (quick, no peer)"
PYTHONPATH=$PWD timeout 110 python3 -m benchmarks kernels --quick --no-peer --reference-t \
  --out "$OUT" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "kernel benchmark, tree before the change (quick, no peer)"
(cd .before && PYTHONPATH=$PWD timeout 110 python3 benchmarks/kernels/bench_moe_lora.py --quick \
  --no-peer --reference-t --out "$OUT/before") >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "decode benchmark, current tree (4 layers, B = 1, 64)"
PYTHONPATH=$PWD timeout 100 python3 -m benchmarks decode --batches 1,64 --steps 20 \
  --out-dir "$OUT" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step done
