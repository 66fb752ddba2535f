"""Where the LoRA overhead of one MoE layer goes: eager and CUDA-graph time, host issue time
and GPU time per kernel, for the base layer and 8 adapters r16 on every token (Qwen3 shapes).

    PYTHONPATH=$PWD python3 benchmarks/kernels/bench_overhead.py --label new --out $OUT

To compare two versions of the code side by side in one device run, run it once per version
with that version first on ``PYTHONPATH`` and the same ``--out``; each run appends JSON lines
to ``overhead.jsonl`` and prints a table of its own rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from benchmarks.kernels.bench_common import Case, bench, bench_graph, make_inputs

from moelora_dist.kernels.moe_lora.ops import config_for, fused_moe_lora


def _host_us(fn, calls: int = 20) -> float:
    """Python time to issue one call while the GPU queue still has room (no sync inside)."""
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return best * 1e6


def _kernel_us(fn, iters: int = 10) -> dict:
    """GPU time per call of each kernel (torch.profiler), summed over launches of a name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            out[ev.key[:60]] = round(t / iters, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="name of this code version in the output")
    ap.add_argument("--out", default=".", help="folder of overhead.jsonl")
    ap.add_argument("--t", type=int, nargs="*", default=[64, 4096, 16384])
    ap.add_argument("--variants", nargs="*", default=[],
                    help="MoEConfig overrides to time as well, e.g. lora_runs:2 "
                         "lora_runs:2,down_shrink_runs:4")
    args = ap.parse_args()
    rows = []
    for T in args.t:
        for case in (Case("qwen3-30b-a3b", T, 0, 0, 0.0), Case("qwen3-30b-a3b", T, 8, 16, 1.0)):
            inp = make_inputs(case)
            cfgs = {"default": None}
            if case.adapters:
                base_cfg = config_for(inp["x_TH"], inp["w_gate_up_EXH"], 8, inp["lora"])
                for v in args.variants:
                    cfgs[v] = dataclasses.replace(base_cfg, **dict(
                        (kv.split(":")[0], int(kv.split(":")[1])) for kv in v.split(",")))
            for name, cfg in cfgs.items():
                fn = lambda: fused_moe_lora(**inp, config=cfg)  # noqa: E731
                try:
                    row = dict(label=args.label, case=case.name, variant=name,
                               eager_ms=bench(fn), graph_ms=bench_graph(fn), host_us=_host_us(fn))
                except Exception as e:  # e.g. tiles that do not fit shared memory: go on
                    print(f"{args.label:6s} {case.name:30s} {name:20s} failed: {e!r}"[:200])
                    continue
                row["kernels_us"] = _kernel_us(fn)
                row["gpu_us"] = round(sum(row["kernels_us"].values()), 1)
                rows.append(row)
                print(f"{args.label:6s} {case.name:30s} {name:20s} eager {row['eager_ms']:.4f} "
                      f"graph {row['graph_ms']:.4f} ms host {row['host_us']:.0f} us "
                      f"gpu {row['gpu_us']:.0f} us")
                print("       " + "  ".join(
                    f"{k.strip('_').replace('_kernel', '')[:14]} {us:.1f}"
                    for k, us in sorted(row["kernels_us"].items(), key=lambda kv: -kv[1])))
            del inp
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overhead.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
