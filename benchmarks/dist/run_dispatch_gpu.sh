#!/usr/bin/env bash
# The fixed-capacity all-to-all (issue 17, part 2) on GPUs, in one device command of about
# 4 minutes on nvidia-h200-x2 (NPROC=2, the default):
#   1. tests/gpu/test_dispatch_kernels_gpu.py on one GPU (kernels vs references, bit for bit;
#      the EP 1 layer in a CUDA graph);
#   2. tests/multi_gpu/test_dispatch_fixed_dist.py and the layer tests of the new dispatcher
#      (test_moe_layer_dist.py -k all_to_all_fixed) on NCCL, bf16, Triton experts;
#   3. the correctness sweep on CUDA with every dispatcher;
#   4. the dispatch benchmark (1-256 MB, eager and graphs, host time, forced overflow).
# Everything lands under $OUT: run.log, gpu_dispatch.log, multi_gpu_dispatch.log,
# sweep_cuda_dispatch.json, dist_dispatch.csv.
#   bash benchmarks/dist/run_dispatch_gpu.sh        (from the repository root)
# On the one-GPU kind only step 1 runs (the others need NPROC GPUs and are skipped, said so).
source "$(dirname "$0")/gpu_env.sh"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
step "tests/gpu dispatch kernels (one GPU)"
timeout 120 python3 -m pytest tests/gpu/test_dispatch_kernels_gpu.py -q -p no:cacheprovider -rf \
  >"$OUT/gpu_dispatch.log" 2>&1; echo "rc=$?" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/gpu_dispatch.log" | tee -a "$LOG"
if [ "$GPUS" -lt "${NPROC:-2}" ]; then
  step "skipped: $GPUS GPU(s) visible, the multi-GPU steps need ${NPROC:-2}"; step done; exit 0
fi
step "tests/multi_gpu fixed dispatcher, NCCL, bf16"
MOELORA_DIST_BACKEND=nccl timeout 200 $TR -m pytest tests/multi_gpu/test_dispatch_fixed_dist.py \
  "tests/multi_gpu/test_moe_layer_dist.py" -k "fixed" -q -p no:cacheprovider -rf \
  >"$OUT/multi_gpu_dispatch.log" 2>&1; echo "rc=$?" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/multi_gpu_dispatch.log" | tee -a "$LOG"
step "sweep on CUDA, every dispatcher"
timeout 100 python3 -m moelora_dist.cli sweep --device cuda --max-world "${NPROC:-2}" \
  --dispatchers all_reduce,all_to_all,all_to_all_static,all_to_all_fixed \
  --json "$OUT/sweep_cuda_dispatch.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "dispatch benchmark"
timeout 150 $TR -m benchmarks.dist.bench_dispatch --out "$OUT/dist_dispatch.csv" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step done
