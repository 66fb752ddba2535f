#!/usr/bin/env bash
# One device run on nvidia-h200-x2 (fits the tool's 600 s limit): tests/multi_gpu on NCCL with
# Triton experts, both benchmarks, tests/multi_gpu with the torch reference experts, the sweep
# on CUDA. Everything lands under $OUT: run.log (all output), dist_dispatch.csv,
# dist_layer_prefill.csv, dist_layer_decode.csv, sweep_cuda.json.
#   bash benchmarks/dist/run_gpu.sh        (from the repository root)
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 MOELORA_DIST_TIMEOUT=60
LOG=$OUT/run.log
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
step "multi_gpu tests (layer), NCCL, Triton experts"
MOELORA_DIST_BACKEND=nccl timeout 120 $TR -m pytest tests/multi_gpu/test_moe_layer_dist.py -q \
  -p no:cacheprovider >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "multi_gpu tests (e2e runner), NCCL, Triton experts"
MOELORA_DIST_BACKEND=nccl timeout 60 $TR -m pytest tests/multi_gpu/test_e2e_runner.py -q -x \
  -p no:cacheprovider >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "dispatch benchmark"
timeout 100 $TR benchmarks/dist/bench_dispatch.py --profile --out "$OUT/dist_dispatch.csv" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step "layer benchmark"
timeout 140 $TR benchmarks/dist/bench_layer.py --out-prefix "$OUT/dist_layer" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"
step "multi_gpu tests, NCCL, torch reference experts"
MOELORA_BACKEND=torch MOELORA_DIST_BACKEND=nccl timeout 70 $TR -m pytest \
  tests/multi_gpu/test_moe_layer_dist.py -q -p no:cacheprovider -x >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step "sweep on CUDA"
timeout 80 python3 -m moelora_dist.cli sweep --device cuda --max-world 2 \
  --json "$OUT/sweep_cuda.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
step done
