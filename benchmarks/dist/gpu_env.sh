# Sourced by the device-run scripts of this folder: the output folder, NCCL settings (NVLink
# multicast off), the torchrun command `$TR` ($NPROC processes, default 2), a `step` logger
# into $OUT/run.log, and the device and version lines at the top of that log.
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 MOELORA_DIST_TIMEOUT=60
LOG=$OUT/run.log
TR="python3 -m torch.distributed.run --standalone --nproc-per-node ${NPROC:-2}"
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step env
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
