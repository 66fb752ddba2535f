#!/usr/bin/env bash
# The closing device run on nvidia-h200-x2 (fits the tool's 600 s limit): every tests/multi_gpu
# test (layer and model runner) on NCCL with the Triton experts in bf16, the sweep on CUDA and
# the layer benchmark (EP 2 vs one GPU, decode). The dispatch benchmark is in run_gpu.sh.
# Everything lands under $OUT: run.log, multi_gpu.log, sweep_cuda.json, dist_layer_*.csv.
#   bash benchmarks/dist/run_gpu_final.sh        (from the repository root)
#   NPROC=4 bash benchmarks/dist/run_gpu_final.sh   (4 GPUs: tests, sweep up to world 4)
source "$(dirname "$0")/gpu_env.sh"
step "tests/multi_gpu (all), NCCL, Triton experts, bf16"
MOELORA_DIST_BACKEND=nccl timeout 240 $TR -m pytest tests/multi_gpu -q -p no:cacheprovider -rf \
  >"$OUT/multi_gpu.log" 2>&1; echo "rc=$?" | tee -a "$LOG"; grep -E "passed|failed" "$OUT/multi_gpu.log" | tee -a "$LOG"
step "sweep on CUDA"
timeout 80 python3 -m moelora_dist.cli sweep --device cuda --max-world ${NPROC:-2} \
  --dispatchers all_reduce,all_to_all,all_to_all_static,all_to_all_fixed --json "$OUT/sweep_cuda.json" \
  >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "layer benchmark"
timeout 150 $TR -m benchmarks.dist.bench_layer --out-prefix "$OUT/dist_layer" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step done
