#!/usr/bin/env bash
# One device run (nvidia-h200) for the kernel tuning of issue 16, in one call so that the
# Triton cache the tuner fills serves the tests and the benchmark (a fresh machine compiles
# every kernel variant again, minutes of it):
#   tune   moelora-dist tune-kernels on the four benchmark shapes, base and LoRA (8 adapters
#          r16), 170 s budget, into moelora_dist/kernels/moe_lora/tuned/NVIDIA_H200.json, copied
#          to $OUT (commit that file);                                       about 3 min
#   test   tests/gpu: every tuned entry against the reference, the LoRA variants in bf16, and
#          the rest of the GPU tests;                                         about 2-3 min
#   bench  the kernel benchmark with the tuned file (no transformers peer; the peer
#          numbers are reference rows of the CSV and plot);                   about 2-3 min
#   bash benchmarks/device/run_tuning.sh [tune] [test] [bench]    (default: all three)
# Everything lands under $OUT: run.log, tune.log, NVIDIA_H200.json, gpu_tests.log,
# kernels_NVIDIA_H200.csv/.png.
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
export MOELORA_GIT_COMMIT=${MOELORA_GIT_COMMIT:-unknown}
STEPS=${*:-tune test bench}
TUNED=moelora_dist/kernels/moe_lora/tuned/NVIDIA_H200.json
LOG=$OUT/run.log
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; nproc; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
if [[ " $STEPS " == *" tune "* ]]; then
  step "tune-kernels (budget 170 s)"
  timeout 215 python3 -m moelora_dist.cli.main tune-kernels \
    --shape qwen3-30b-a3b mixtral-8x7b olmoe deepseek-v3-routed \
    --tokens 1,16,64,256,1024,4096,16384 --lora --ranks 16 --budget-s 170 --out "$TUNED" \
    >"$OUT/tune.log" 2>&1; echo "rc=$?" | tee -a "$LOG"; tail -3 "$OUT/tune.log" | tee -a "$LOG"
  cp "$TUNED" "$OUT/" 2>/dev/null
fi
if [[ " $STEPS " == *" test "* ]]; then
  step "GPU tests"
  timeout 190 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rf \
    >"$OUT/gpu_tests.log" 2>&1; echo "rc=$?" | tee -a "$LOG"; tail -6 "$OUT/gpu_tests.log" | tee -a "$LOG"
fi
if [[ " $STEPS " == *" bench "* ]]; then
  step "kernel benchmark (tuned configs, no transformers peer)"
  timeout 175 python3 -m benchmarks kernels --no-peer --out "$OUT" >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
fi
step done
