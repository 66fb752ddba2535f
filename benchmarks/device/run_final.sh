#!/usr/bin/env bash
# The closing device run (nvidia-h200; the session's device time left fits one command of
# ~8 minutes):
#   1. tests/gpu, most important file first (isolation, kernels, FP8, sampling, dispatch
#      kernels, paged attention, engine graphs), bf16 Triton;
#   2. the kernel benchmark (--quick, no peer) of the current tree and of the tree before the
#      reorganization (.before/, `git archive 31adc40 moelora_dist benchmarks/kernels tests/gpu`);
#   3. the engine benchmark at full Qwen3-30B-A3B depth, concurrency 1 and 64, 32 output tokens.
# Everything lands under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT/before"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOELORA_GIT_COMMIT=${MOELORA_GIT_COMMIT:-unknown}
LOG=$OUT/run.log
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
step "GPU tests"
PYTHONPATH=$PWD timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -rf \
  tests/gpu/test_isolation_gpu.py tests/gpu/test_kernels_gpu.py tests/gpu/test_fp8_gpu.py \
  tests/gpu/test_sampling_gpu.py tests/gpu/test_dispatch_kernels_gpu.py \
  tests/gpu/test_paged_attention_gpu.py tests/gpu/test_engine_gpu.py >"$OUT/gpu_tests.log" 2>&1
echo "rc=$?" | tee -a "$LOG"; tail -15 "$OUT/gpu_tests.log" | tee -a "$LOG"
step "kernel benchmark, current tree (quick, no peer)"
PYTHONPATH=$PWD timeout 60 python3 -m benchmarks kernels --quick --no-peer --reference-t \
  --out "$OUT" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "kernel benchmark, tree before the change (quick, no peer)"
(cd .before && PYTHONPATH=$PWD timeout 50 python3 benchmarks/kernels/bench_moe_lora.py --quick \
  --no-peer --reference-t --out "$OUT/before") >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "engine benchmark (48 layers, concurrency 1 and 64)"
PYTHONPATH=$PWD timeout ${ENGINE_S:-160} python3 -m benchmarks engine --concurrency 1,64 \
  --output-len 32 --out-dir "$OUT" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step done
