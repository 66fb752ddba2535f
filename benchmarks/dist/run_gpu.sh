#!/usr/bin/env bash
# One device run on nvidia-h200-x2 (fits the tool's 600 s limit): tests/multi_gpu (layer) on
# NCCL with Triton experts in bf16, both benchmarks, the sweep on CUDA. Everything lands under
# $OUT: run.log (all output), dist_dispatch.csv, dist_layer_prefill.csv, dist_layer_decode.csv,
# sweep_cuda.json. Earlier runs also ran the torch-reference experts and the e2e runner tests
# (see benchmarks/results/dist_run_gpu*.log); set FULL=1 to include them.
#   bash benchmarks/dist/run_gpu.sh        (from the repository root)
source "$(dirname "$0")/gpu_env.sh"
step "multi_gpu tests (layer), NCCL, Triton experts, bf16"
MOELORA_DIST_BACKEND=nccl timeout 150 $TR -m pytest tests/multi_gpu/test_moe_layer_dist.py -q \
  -p no:cacheprovider -rf >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
if [ "${FULL:-0}" = 1 ]; then
  step "multi_gpu tests (all), NCCL, torch reference experts"
  MOELORA_BACKEND=torch MOELORA_DIST_BACKEND=nccl timeout 90 $TR -m pytest tests/multi_gpu -q \
    -p no:cacheprovider -x >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
fi
step "dispatch benchmark"
timeout 150 $TR -m benchmarks.dist.bench_dispatch --out "$OUT/dist_dispatch.csv" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step "layer benchmark"
timeout 150 $TR -m benchmarks.dist.bench_layer --out-prefix "$OUT/dist_layer" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step "sweep on CUDA"
timeout 80 python3 -m moelora_dist.cli sweep --device cuda --max-world 2 \
  --dispatchers all_reduce,all_to_all,all_to_all_static,all_to_all_fixed --json "$OUT/sweep_cuda.json" \
  >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step done
