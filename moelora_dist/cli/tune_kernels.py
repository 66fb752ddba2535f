"""``moelora-dist tune-kernels``: measure the MoE LoRA kernels' tile configs on this GPU and write
the tuned file that ``pick_config`` reads (``docs/tuning.md``).

    moelora-dist tune-kernels --shape qwen3-30b-a3b mixtral-8x7b olmoe deepseek-v3-routed \\
        --tokens 1,16,64,256,1024,4096,16384 --lora --budget-s 180 \\
        --out moelora_dist/kernels/moe_lora/tuned/NVIDIA_H200.json

FP8 experts (block-FP8 weights, bf16 activations) are tuned by a second run of the same command
with ``--fp8`` into the same file: its entries go under the dtype key ``bfloat16+fp8`` beside
the ``bfloat16`` ones.

Every candidate is checked against the reference before it is timed (a CUDA-graph replay,
``triton.testing.do_bench``); a candidate that fails to compile, to launch or to match is skipped
and recorded in the file's ``skipped`` list. The run stops within ``--budget-s`` seconds with
the best config found so far for every (shape, T); the file merges into an existing one of the
same device. ``--device cpu`` runs the kernels in the Triton interpreter: only for exercising
the tuner itself (its times say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
import time

from moelora_dist.errors import OptionError

DEFAULT_TOKENS = "1,16,64,256,1024,4096,16384"
log = logging.getLogger("moelora_dist.tune_kernels")


def _ints(text: str, flag: str, lo: int = 1, hi: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{flag} {text!r}: expected comma-separated integers") from None
    bad = [v for v in vals if v < lo or (hi is not None and v > hi)]
    if not vals or bad:
        raise OptionError(f"{flag} {text!r}: every value must be in [{lo}, {hi or 'inf'}]")
    return sorted(set(vals))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", nargs="+", required=True, metavar="SHAPE",
                   help="qwen3-30b-a3b, mixtral-8x7b, olmoe, deepseek-v3-routed (H 7168, E 256, "
                        "K 8, I 2048 at EP 8), or H,E,K,I[,EP[,MOE_TP]] (one or more)")
    p.add_argument("--tokens", default=DEFAULT_TOKENS,
                   help=f"token counts to tune (default {DEFAULT_TOKENS}); a call picks the "
                        "nearest in log2")
    p.add_argument("--lora", action="store_true",
                   help="also tune LoRA calls (--adapters adapters of each --ranks rank)")
    p.add_argument("--ranks", default="16", help="LoRA ranks to tune, comma-separated "
                   "(default 16; each gives a lora_r<BR> entry, BR its rank tile)")
    p.add_argument("--adapters", type=int, default=8,
                   help="adapters in the LoRA batch, each on a run of the tokens (default 8)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="dtype of the activations, and of the expert weights without --fp8 "
                        "(default bfloat16)")
    p.add_argument("--fp8", action="store_true",
                   help="tune FP8 experts only (the weights block-quantized to e4m3 with "
                        "128x128 fp32 scales): entries under '<dtype>+fp8'; run once without "
                        "and once with it, into the same --out, for both")
    p.add_argument("--budget-s", type=float, default=180.0,
                   help="wall-clock seconds for the whole run, start-up included (default 180)")
    p.add_argument("--out", required=True, metavar="FILE.json",
                   help="tuned file to write or merge into (one device per file)")
    p.add_argument("--keep-faster", action="store_true",
                   help="the entry --out has is one more candidate, timed in this run: "
                        "it is replaced only by a config faster in the same run (where the "
                        "budget left it untimed, only by one faster than its recorded time); "
                        "a short budget then cannot undo a longer run's finds")
    p.add_argument("--refine-order", action="store_true",
                   help="no search: time the entries --out already has for these shapes, "
                        "tokens (and with --lora, ranks) in this run, each in every program "
                        "order (group_m), and keep the fastest, the stored one included; "
                        "problems --out has no entry for are left out (named in the log)")
    p.add_argument("--jobs", type=int, default=None,
                   help="compile worker processes (default: CPU cores - 2, at most 16; 0: none)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu: the Triton interpreter, to exercise the tuner")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_options(args):
    """Every cheap check, before CUDA or any kernel: (shapes, tokens, ranks)."""
    from moelora_dist.files.paths import check_writable
    from moelora_dist.tuning.problems import parse_shape

    shapes = list(dict.fromkeys(parse_shape(s) for s in args.shape))
    tokens = _ints(args.tokens, "--tokens", 1, 1 << 20)
    ranks = _ints(args.ranks, "--ranks", 1, 256)
    if not 1 <= args.adapters <= 8:
        raise OptionError(f"--adapters {args.adapters}: must be in [1, 8] (the pool's slots)")
    if args.budget_s <= 0:
        raise OptionError(f"--budget-s {args.budget_s}: must be positive")
    if args.jobs is not None and args.jobs < 0:
        raise OptionError(f"--jobs {args.jobs}: must be >= 0")
    check_writable(args.out, "--out")
    if args.refine_order and args.keep_faster:
        raise OptionError("--refine-order already keeps the stored entry unless another "
                          "program order is faster in the same run; drop --keep-faster")
    if args.refine_order and not os.path.exists(args.out):
        raise OptionError(f"--refine-order: --out {args.out} does not exist; it re-times the "
                          "entries of an existing tuned file")
    return shapes, tokens, ranks


def main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    shapes, tokens, ranks = check_options(args)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        from moelora_dist.testing.interpreter import fix_e4m3_cast

        fix_e4m3_cast()  # else the interpreter's e4m3 cast fails every FP8 candidate's check
    import torch

    from moelora_dist.logs import setup_logging
    from moelora_dist.tuning import output
    from moelora_dist.tuning.compile_pool import CompilePool
    from moelora_dist.tuning.measure import GraphTimer, WallTimer
    from moelora_dist.tuning.problems import Problem
    from moelora_dist.tuning.search import Tuner

    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda but torch sees no CUDA device; run it on the GPU "
                          "machine (--device cpu only exercises the tuner)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    previous = output.load_previous(args.out, name)
    base = [Problem(s, T, dtype=args.dtype, fp8=args.fp8) for s in shapes for T in tokens]
    lora = [Problem(s, T, r, args.adapters, args.dtype, args.fp8) for r in ranks
            for s in shapes for T in tokens] if args.lora else []
    refine = None
    if args.refine_order:
        refine, missing = output.stored_entries(previous, base + lora)
        for p in missing:
            log.warning("%s: --out has no entry for it; not refined", p.name)
        if not refine:
            raise OptionError(f"--refine-order: --out {args.out} has no entry for any of the "
                              f"{len(base) + len(lora)} problems asked")
    jobs = args.jobs if args.jobs is not None else min(16, max(1, (os.cpu_count() or 2) - 2))
    if args.device == "cpu":
        jobs = 0  # the interpreter compiles nothing
    pool = CompilePool(jobs, f"cuda:{torch.cuda.current_device()}" if args.device == "cuda"
                       else "cpu")
    timer = GraphTimer() if args.device == "cuda" else WallTimer()
    log.info("tuning %d problems (%s) on %s in %.0f s, %d compile workers",
             len(base) + len(lora), base[0].dtype_key, name, args.budget_s, jobs)
    tuner = Tuner(base, lora, device=args.device, timer=timer, pool=pool,
                  budget_s=args.budget_s - (time.monotonic() - t0) - 2.0,
                  progress=not args.quiet, refine=refine,
                  stored=output.stored_configs(previous, base + lora) if args.keep_faster
                  else None)
    try:
        outcomes, skipped = tuner.run()
    finally:
        pool.close()
    meta = dict(command=shlex.join(["moelora-dist", "tune-kernels", *sys.argv[2:]])
                if len(sys.argv) > 1 and sys.argv[1] == "tune-kernels" else "tune-kernels",
                utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                torch=torch.__version__, triton=_triton_version(), commit=_commit(),
                dtype=base[0].dtype_key, budget_s=args.budget_s,
                wall_s=round(time.monotonic() - t0, 1), jobs=jobs,
                problems=len(refine) if refine is not None else len(base) + len(lora),
                tuned=len(outcomes), entries=len(outcomes), skipped=len(skipped),
                **({"refine_order": True} if refine is not None else {}))
    if args.keep_faster:
        outcomes, kept = output.faster_only(outcomes, previous)
        meta.update(entries=len(outcomes), kept_previous=kept)  # entries: what this run wrote
        log.info("--keep-faster: %d entries kept from --out (their recorded time was lower)",
                 kept)
    output.write(args.out, output.build(name, outcomes, skipped, meta, previous))
    gains = [o.default_ms / o.ms for o in outcomes if o.ms > 0 and o.default_ms < float("inf")]
    log.info("wrote %s: %d entries (%d of %d problems), %d candidates skipped, %.1f s; "
             "speed-up over the heuristic: median %.2fx, best %.2fx", args.out, len(outcomes),
             len(outcomes), len(base) + len(lora), len(skipped), meta["wall_s"],
             sorted(gains)[len(gains) // 2] if gains else float("nan"),
             max(gains) if gains else float("nan"))
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
