"""Per-kernel GPU time of fused_moe_lora for a few benchmark cases (torch.profiler).

    PYTHONPATH=$PWD python3 benchmarks/kernels/profile_moe_lora.py [--t 1 64 4096]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels.bench_common import Case, bench_graph, make_inputs

from benchmarks.kernels.bench_stages import variant_times

from moelora_dist.kernels.moe_lora.ops import fused_moe_lora


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, nargs="*", default=[1, 64, 4096])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", action="store_true", help="also time the config variants")
    args = ap.parse_args()
    for T in args.t:
        for case in (Case("qwen3-30b-a3b", T, 0, 0, 0.0), Case("qwen3-30b-a3b", T, 8, 16, 1.0)):
            inp = make_inputs(case)
            for _ in range(3):
                fused_moe_lora(**inp)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                for _ in range(args.iters):
                    fused_moe_lora(**inp)
                torch.cuda.synchronize()
            print(f"== {case.name}: per-call CUDA time by kernel (us)")
            rows = []
            for ev in p.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t > 0:
                    rows.append((t / args.iters, ev.key[:70]))
            for t, k in sorted(rows, reverse=True)[:14]:
                print(f"{t:10.1f}  {k}")
            if args.variants:
                timer = bench_graph if T <= 512 else None  # no launch noise at decode sizes
                for name, ms in variant_times(inp, timer).items():
                    print(f"   variant {name:24s} {ms * 1e3:9.1f} us{' (graph)' if timer else ''}")


if __name__ == "__main__":
    main()
