#!/usr/bin/env bash
# One device call (nvidia-h200) of the GPU tests and benchmarks, by steps, each bounded by its
# own timeout so that the call ends inside the tool's 10-minute limit:
#   tests     tests/gpu except the tuned-config file, in 6 pytest processes at once (their
#             Triton compiles run on separate cores; no test times anything)     ~3-4 min
#   quick     a kernel change's GPU tests in 4 processes: kernels + isolation + dense, the
#             tuned-config file and the LoRA variants, engine + families + paged attention,
#             FP8 on the Qwen3 shape + FP8 linear + greedy (FP8 DeepSeek-V3 and Mixtral are in
#             `tests`: their compiles take minutes)                              ~3-4 min
#   tune      tune-kernels --keep-faster on the four benchmark shapes, base and LoRA r16, into the
#             tuned file of the call's GPU (\$TUNED below; commit it)   ~3 min
#             (${TUNE_SHAPES} and ${TUNE_TOKENS} replace the shapes and the token counts)
#   refine    tune-kernels --refine-order on every shipped bf16 and +fp8 entry of the four
#             shapes: each re-timed in every program order (group_m), the fastest kept, in
#             one run (${REFINE_S:-100} s each)                                 ~4 min
#   tunefp8   tune-kernels --fp8 --keep-faster (FP8 experts, "bfloat16+fp8" entries) on
#             Qwen3, Mixtral and DeepSeek-V3 routed, base and LoRA r16, into the same file
#                                                                                ~3 min
#   tuned     tests/gpu/test_tuned_configs_gpu.py (every tuned entry vs the reference, the
#             +fp8 ones on FP8 experts; 105 bf16 cases took 95 s, so up to ~200 s with the
#             FP8 entries: ${TUNED_S:-240})
#   kernels   the kernel benchmark (${KERNELS_ARGS:---quick --no-peer}; e.g. --tokens 64,256
#             --models mixtral-8x7b keeps those cases only; ${KERNELS_S:-150} s)
#   kbefore   the same with ${KBEFORE_ARGS} into $RES/before: the "before" side of an A/B
#             with a step that changes the tree (e.g. `kbefore tune kernels`)
#   engine    the engine benchmark, 48 layers, 8 adapters r16 vs none
#   fp8       the FP8 kernel benchmark (--quick)
#   families  kernel benchmark --families-only --quick; engine on the gpt-oss-20b shape
#   serve     the HTTP benchmark (wheels carried in .whl/serve, see docs/serve.md; with
#             SERVE_FAST=1 also .whl/serve-fast: httptools and uvloop, which uvicorn then picks
#             in every variant: a baseline variant names --http-impl h11 --event-loop asyncio);
#             options ${SERVE_ARGS:---concurrency 1,64}, shell words that quotes group, may
#             hold --http-variant options (one HTTP side each, each adds its time: raise
#             T_SCALE), e.g. SERVE_ARGS='--concurrency 64 --http-variant default=
#             --http-variant "si=--switch-interval-ms 0.2"'
#   enginetp  the engine benchmark under torchrun on each (tp, ep) of ${ENGINE_TP_LAYOUTS:-2,1 2,2}
#             (a machine of that many GPUs: nvidia-h200-x2), ${ENGINE_ARGS}; CSVs
#             engine_<device>_tp<N>_ep<M>.csv (issue 18)
#   enginefp8 the engine benchmark on an FP8 model
#   launches  kernels, their GPU us and host ms per layer of an eager decode step (4 layers);
#             ${LAUNCH_ARGS} added (--host-profile: cProfile of each case's host time)
#   dense     the dense-LoRA and isolation GPU tests only (a quick check of a dense change)
#   pending   the GPU tests of what was built without a GPU (fused expand and top-k sum in
#             test_kernels_gpu.py, FP8 linear incl. the K split, FP8 greedy) and of the plain
#             kernels S10 refactored (dense LoRA, the paged-attention file), the engine's
#             graph-vs-eager tests with the fusions on and off                   ~5 min
#   ab        launches once per variant of ${AB}: "name=FIELD=V,FIELD=V;name2=..." (MoEConfig
#             fields set on the shipped lora_r16 entries up to T=256 by
#             benchmarks/device/override_configs.py; "name=" runs the shipped file as is),
#             labelled ab-<name>                                        ~15 s per variant
#   consts    launches once per variant of ${CONSTS}: "name=MOD:NAME=V,MOD:NAME=V;name2=..."
#             (module constants set by benchmarks/device/with_constants.py; "name=" runs
#             the code as is), labelled c-<name> (launches options: ${LAUNCHES_ARGS}, e.g.
#             --fp8); with ENGINE_CONSTS=1 also the engine benchmark per variant
#             (${ENGINE_ARGS}), its CSV engine_c-<name>.csv
#   bash benchmarks/device/run_session.sh STEP...
# Logs and CSVs go to $RES; after every step they are packed into $OUT/results.tgz (the tool
# brings back at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/moelora-out}
RES=${RES:-/tmp/moelora-res}
# A machine can come back with an earlier call's $RES: start from an empty one (KEEP_RES=1 keeps it).
[ -n "${KEEP_RES:-}" ] || rm -rf "$RES"
mkdir -p "$OUT" "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
export MOELORA_GIT_COMMIT=${MOELORA_GIT_COMMIT:-unknown}
# The tuned file of this GPU (NVIDIA_H200.json, NVIDIA_H100_80GB_HBM3.json, ...): `tune`, `refine`
# and `tunefp8` write the file of the device the call runs on.
TUNED=$(python3 -c 'import torch; from moelora_dist.kernels.moe_lora.tuned import PACKAGE_DIR, file_name
print(PACKAGE_DIR.relative_to(PACKAGE_DIR.parents[3]) / file_name(torch.cuda.get_device_name()))' \
  2>/dev/null || echo moelora_dist/kernels/moe_lora/tuned/NVIDIA_H200.json)
LOG=$RES/run.log
step() { echo "=== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
pack() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; }
rc() { echo "rc=$1" | tee -a "$LOG"; pack; }
T=${T_SCALE:-1}  # scales every timeout
t() { echo $(( $1 * T )); }
step "env $*"
{ nvidia-smi -L; nproc; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
for s in "$@"; do
  case $s in
  tests)
    step "GPU tests but the tuned-config file (6 processes)"
    g=tests/gpu
    for k in qwen3 mixtral deepseek "linear or greedy"; do  # test_fp8_gpu.py by shape: ~3 min
      timeout "$(t 240)" python3 -m pytest -q -p no:cacheprovider -rf $g/test_fp8_gpu.py -k "$k" \
        >"$RES/gpu_tests_fp8_${k%% *}.log" 2>&1 &
    done
    timeout "$(t 240)" python3 -m pytest -q -p no:cacheprovider -rf $g/test_families_gpu.py \
      $g/test_engine_gpu.py $g/test_paged_attention_gpu.py >"$RES/gpu_tests_engine.log" 2>&1 &
    timeout "$(t 240)" python3 -m pytest -q -p no:cacheprovider -rf $g/test_isolation_gpu.py \
      $g/test_kernels_gpu.py $g/test_sampling_gpu.py $g/test_dispatch_kernels_gpu.py \
      >"$RES/gpu_tests_kernels.log" 2>&1 &
    wait
    for f in "$RES"/gpu_tests_*.log; do echo "$f: $(tail -1 "$f")" | tee -a "$LOG"; done; pack ;;
  quick)
    step "GPU tests of a kernel change (4 processes)"
    g=tests/gpu
    q() { local name=$1; shift; timeout "$(t ${QUICK_S:-300})" python3 -m pytest -q \
      -p no:cacheprovider -rf "$@" >"$RES/gpu_tests_$name.log" 2>&1; }
    q kernels $g/test_kernels_gpu.py $g/test_isolation_gpu.py $g/test_sampling_gpu.py &
    q tuned $g/test_tuned_configs_gpu.py &
    q engine $g/test_engine_gpu.py $g/test_families_gpu.py $g/test_paged_attention_gpu.py &
    q fp8 $g/test_fp8_gpu.py -k "qwen3 or linear or greedy" &
    wait
    for f in "$RES"/gpu_tests_*.log; do echo "$f: $(tail -1 "$f")" | tee -a "$LOG"; done; pack ;;
  tune)
    step "tune-kernels (budget ${TUNE_S:-150} s)"
    timeout "$(t $(( ${TUNE_S:-150} + 45 )))" python3 -m moelora_dist.cli.main tune-kernels \
      --shape ${TUNE_SHAPES:-qwen3-30b-a3b mixtral-8x7b olmoe deepseek-v3-routed} \
      --tokens ${TUNE_TOKENS:-1,16,64,256,1024,4096,16384} --lora --ranks 16 --budget-s "${TUNE_S:-150}" \
      --out "$TUNED" --keep-faster --quiet >"$RES/tune.log" 2>&1; rc $?
    tail -3 "$RES/tune.log" | tee -a "$LOG"; cp "$TUNED" "$RES/" 2>/dev/null; pack ;;
  refine)
    step "tune-kernels --refine-order, bf16 then FP8 (budget ${REFINE_S:-100} s each)"
    for extra in "" "--fp8"; do
      timeout "$(t $(( ${REFINE_S:-100} + 45 )))" python3 -m moelora_dist.cli.main tune-kernels \
        --shape qwen3-30b-a3b mixtral-8x7b olmoe deepseek-v3-routed \
        --tokens 1,16,64,256,1024,4096,16384 --lora --ranks 16 $extra --refine-order \
        --budget-s "${REFINE_S:-100}" --out "$TUNED" --quiet >>"$RES/tune_refine.log" 2>&1; rc $?
    done
    tail -4 "$RES/tune_refine.log" | tee -a "$LOG"; cp "$TUNED" "$RES/" 2>/dev/null; pack ;;
  tunefp8)
    step "tune-kernels --fp8 (budget ${TUNE_FP8_S:-150} s)"
    timeout "$(t $(( ${TUNE_FP8_S:-150} + 45 )))" python3 -m moelora_dist.cli.main tune-kernels \
      --shape qwen3-30b-a3b mixtral-8x7b deepseek-v3-routed \
      --tokens 1,16,64,256,1024,4096,16384 --lora --ranks 16 --fp8 \
      --budget-s "${TUNE_FP8_S:-150}" --out "$TUNED" --keep-faster --quiet >"$RES/tune_fp8.log" 2>&1
      rc $?
    tail -3 "$RES/tune_fp8.log" | tee -a "$LOG"; cp "$TUNED" "$RES/" 2>/dev/null; pack ;;
  tuned)
    step "tuned-config GPU tests"
    timeout "$(t ${TUNED_S:-240})" python3 -m pytest -q -p no:cacheprovider -rf \
      tests/gpu/test_tuned_configs_gpu.py >"$RES/gpu_tests_tuned.log" 2>&1; rc $?
    tail -1 "$RES/gpu_tests_tuned.log" | tee -a "$LOG" ;;
  kernels)
    step "kernel benchmark (${KERNELS_ARGS:---quick --no-peer})"
    timeout "$(t ${KERNELS_S:-150})" python3 -m benchmarks kernels ${KERNELS_ARGS:---quick --no-peer} \
      --out "$RES" >>"$RES/kernels.log" 2>&1; rc $? ;;
  kbefore)
    step "kernel benchmark before the steps after it (${KBEFORE_ARGS:---quick --no-peer})"
    mkdir -p "$RES/before"
    timeout "$(t ${KBEFORE_S:-150})" python3 -m benchmarks kernels ${KBEFORE_ARGS:---quick --no-peer} \
      --out "$RES/before" >>"$RES/kernels_before.log" 2>&1; rc $? ;;
  engine)
    step "engine benchmark (48 layers; ${ENGINE_ARGS:-default cases})"
    timeout "$(t ${ENGINE_S:-260})" python3 -m benchmarks engine ${ENGINE_ARGS:-} --out-dir "$RES" \
      >>"$RES/engine_run.log" 2>&1; rc $? ;;
  fp8)
    step "FP8 kernel benchmark (quick)"
    timeout "$(t 120)" python3 -m benchmarks fp8 --quick --out "$RES" >>"$RES/fp8.log" 2>&1
    rc $? ;;
  families)
    step "families: kernel benchmark --families-only --quick"
    timeout "$(t 60)" python3 -m benchmarks kernels --families-only --quick --no-peer \
      --out "$RES/families" >>"$RES/families.log" 2>&1; rc $?
    step "families: engine on gpt-oss-20b"
    timeout "$(t 100)" python3 -m benchmarks engine --model gpt-oss-20b --quick \
      --concurrency 1,64 --prompt-len 256 --output-len 32 --out-dir "$RES/families" \
      >>"$RES/families.log" 2>&1; rc $? ;;
  serve)
    step "serve benchmark"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/serve/*.whl ${SERVE_FAST:+.whl/serve-fast/*.whl} \
      >>"$RES/serve.log" 2>&1
    eval "serve_args=(${SERVE_ARGS:---concurrency 1,64})"  # quotes in SERVE_ARGS group words
    PYTHONPATH=/tmp/site:$PWD timeout "$(t 170)" python3 -m benchmarks serve \
      "${serve_args[@]}" --out-dir "$RES" >>"$RES/serve.log" 2>&1; rc $? ;;
  enginetp)
    step "engine benchmark on TP layouts (${ENGINE_TP_LAYOUTS:-2,1 2,2}; ${ENGINE_ARGS:-default cases})"
    for lay in ${ENGINE_TP_LAYOUTS:-2,1 2,2}; do
      tp=${lay%,*}; ep=${lay#*,}
      timeout "$(t ${ENGINE_S:-260})" python3 -m torch.distributed.run --standalone \
        --nproc-per-node "$tp" -m benchmarks engine --tp "$tp" --ep "$ep" ${ENGINE_ARGS:-} \
        --out-dir "$RES" >>"$RES/engine_tp${tp}_ep${ep}_run.log" 2>&1; rc $?
      tail -5 "$RES/engine_tp${tp}_ep${ep}_run.log" | tee -a "$LOG"
    done ;;
  enginefp8)
    step "engine benchmark, FP8 model"
    timeout "$(t 140)" python3 -m benchmarks engine --fp8 ${ENGINE_FP8_ARGS:---quick \
      --concurrency 1,64} --out-dir "$RES" >>"$RES/engine_fp8_run.log" 2>&1; rc $? ;;
  launches)
    step "launches per layer (4 layers)"
    timeout "$(t 120)" python3 -m benchmarks launches --out "$RES" --label "${LAUNCH_LABEL:-new}" \
      ${LAUNCH_ARGS:-} >>"$RES/launches.log" 2>&1; rc $? ;;
  dense)
    step "dense-LoRA GPU tests"
    timeout "$(t 120)" python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_kernels_gpu.py \
      tests/gpu/test_isolation_gpu.py -k "dense" >"$RES/gpu_tests_dense.log" 2>&1; rc $?
    tail -1 "$RES/gpu_tests_dense.log" | tee -a "$LOG" ;;
  pending)
    step "GPU tests of the kernels built without a GPU (S10: fused expand, top-k sum, FP8 split)"
    timeout "$(t 200)" python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_kernels_gpu.py \
      -k "fused_expand or fused_topk or dense" >"$RES/gpu_tests_pending.log" 2>&1; rc $?
    timeout "$(t 150)" python3 -m pytest -q -p no:cacheprovider -rf \
      tests/gpu/test_paged_attention_gpu.py >>"$RES/gpu_tests_pending.log" 2>&1; rc $?
    timeout "$(t 200)" python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_engine_gpu.py \
      -k "fused_paths or graph_decode_equals_eager" >>"$RES/gpu_tests_pending.log" 2>&1; rc $?
    timeout "$(t 200)" python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_fp8_gpu.py \
      -k "linear or greedy" >>"$RES/gpu_tests_pending.log" 2>&1; rc $?
    grep -E "passed|failed" "$RES/gpu_tests_pending.log" | tee -a "$LOG" ;;
  ab)
    step "A/B of tuned-config overrides (launches): ${AB:-none}"
    IFS=';' read -ra variants <<<"${AB:-}"
    for v in "${variants[@]}"; do
      name=${v%%=*}; sets=()
      IFS=',' read -ra fields <<<"${v#*=}"
      for f in "${fields[@]}"; do [ -n "$f" ] && sets+=(--set "$f"); done
      python3 -m benchmarks.device.override_configs "${sets[@]}" --out "/tmp/ab_$name.json" \
        >>"$RES/ab.log" 2>&1 || { echo "override $name failed" | tee -a "$LOG"; continue; }
      MOELORA_KERNEL_CONFIGS=/tmp/ab_$name.json timeout "$(t 120)" python3 -m benchmarks \
        launches --out "$RES" --label "ab-$name" >>"$RES/launches.log" 2>&1; rc $?
    done ;;
  consts)
    step "A/B of module constants: ${CONSTS:-none}"
    IFS=';' read -ra variants <<<"${CONSTS:-}"
    for v in "${variants[@]}"; do
      name=${v%%=*}; sets=()
      IFS=',' read -ra fields <<<"${v#*=}"
      for f in "${fields[@]}"; do [ -n "$f" ] && sets+=(--set "$f"); done
      timeout "$(t 120)" python3 -m benchmarks.device.with_constants "${sets[@]}" -- \
        benchmarks launches --out "$RES" --label "c-$name" ${LAUNCHES_ARGS:-} >>"$RES/launches.log" 2>&1; rc $?
      if [ -n "${ENGINE_CONSTS:-}" ]; then
        mkdir -p "$RES/engine_c-$name"
        timeout "$(t ${ENGINE_S:-260})" python3 -m benchmarks.device.with_constants "${sets[@]}" \
          -- benchmarks engine --out-dir "$RES/engine_c-$name" ${ENGINE_ARGS:-} \
          >"$RES/engine_c-$name.log" 2>&1; rc $?
        tail -6 "$RES/engine_c-$name.log" | tee -a "$LOG"
      fi
    done ;;
  *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
done
step done; pack
