"""Profile decode steps of the model runner (base and 8 adapters) with torch.profiler.

    python benchmarks/e2e/profile_decode.py --batch 64 [--layers 4] [--graphs] [--out-dir DIR]

Prints, per mode, the host time per step and the top CUDA kernels and CPU ops by total time,
so a slow step can be traced to a kernel, a host sync or Python overhead. ``--graphs`` replays
the steps from CUDA graphs (``moelora_dist.models.graphs``); the kernels inside a graph are
still listed one by one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(__file__))

import bench_decode as bd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--graphs", action="store_true", help="decode through CUDA graphs")
    p.add_argument("--out-dir", default=None, help="write the tables here, not to stdout")
    args = p.parse_args(argv)
    bargs = bd.parse_args(["--layers", str(args.layers)])
    groups = bd.make_groups(bargs)
    raw = dict(bd.QWEN3_30B_A3B, num_hidden_layers=args.layers)
    cfg = bd.ModelConfig.from_dict(raw)
    dev = groups.device
    model = bd.MoELoRAModel.build(cfg, groups, bd.RandomWeights(cfg, torch.bfloat16, dev, seed=0),
                                  dtype=torch.bfloat16, max_loras=8, max_rank=16, progress=False)
    for i in range(8):
        model.pool.load(bd.random_adapter(f"a{i}", cfg, 16, dev, seed=100 + i))
    slot_of = [model.pool.slot_of(f"a{i}") for i in range(8)]
    B = args.batch
    graphs = bd.DecodeGraphs(model) if args.graphs else None
    tag = "graph" if args.graphs else "eager"
    for mode in ("base", "lora8", "base"):
        slots = (torch.tensor([slot_of[b % 8] for b in range(B)], dtype=torch.int32, device=dev)
                 if mode == "lora8" else torch.full((B,), -1, dtype=torch.int32, device=dev))
        case = bd.Case(model, bd.prompts(cfg, B, 128), 4 + 2 * args.steps, slots, graphs)
        for _ in range(4):
            case.step()
        bd.sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            case.step()
        bd.sync(dev)
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        print(f"\n##### {tag} {mode} B={B}: {ms:.2f} ms/step")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                case.step()
            bd.sync(dev)
        tables = "\n".join(prof.key_averages().table(sort_by=key, row_limit=30)
                           for key in ("cuda_time_total", "cpu_time_total", "count"))
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, f"decode_{tag}_{mode}_B{B}.txt"), "a") as f:
                f.write(tables)
        else:
            print(tables)


if __name__ == "__main__":
    main()
