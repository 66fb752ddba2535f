"""Host time of one eager MoE layer forward (route, dispatch, experts with LoRA, combine) on
one GPU: what Python spends per layer before the GPU has the work.

    PYTHONPATH=$PWD python3 -m benchmarks.kernels.bench_layer_host --out DIR [--label new]

Qwen3-30B-A3B layer shape (H 2048, E 128, top-8, I 768), bf16, 8 adapters of rank 16 on
every token and no adapter, T in {1, 64, 512}. Host time: the best of 5 rounds of 20 calls
issued back to back with no sync (the GPU queue absorbs them), divided by 20; GPU time: CUDA
events around the same calls after a sync. The script runs on this tree and on the tree
before the reorganization (whose module names differ), so both can be measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _api():
    """(MoEBlock, LoRAMoE, build_batch_info, make_lora, ParallelGroups) of either tree."""
    from moelora_dist.moe.layer import LoRAMoE
    from moelora_dist.parallel.groups import ParallelGroups
    try:
        from moelora_dist.lora.batch_info import build_batch_info
        from moelora_dist.moe.block import MoEBlock
        from moelora_dist.testing.kernel_cases import make_lora
    except ImportError:  # the tree before the reorganization
        from moelora_dist.kernels.testing import make_lora
        from moelora_dist.lora.batch_info import compute_batch_info as build_batch_info
        from moelora_dist.moe.layer import MoEBlock
    return MoEBlock, LoRAMoE, build_batch_info, make_lora, ParallelGroups


class _Pool:
    def __init__(self, buffers):
        self.buffers = buffers

    def moe_buffers(self, layer):
        return self.buffers


def measure(T: int, adapters: int) -> dict:
    MoEBlock, LoRAMoE, build_batch_info, make_lora, ParallelGroups = _api()
    H, E, K, I, S, R = 2048, 128, 8, 768, 8, 16
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    groups = ParallelGroups.single(dev)
    shard = groups.rank_layout.moe_shard(E, I)
    bf = dict(device=dev, dtype=torch.bfloat16)
    block = MoEBlock.from_full(torch.randn(E, H, generator=g, device=dev).bfloat16(),
                               (torch.randn(E, 2 * I, H, generator=g, device=dev) * 0.02).to(**bf),
                               (torch.randn(E, H, I, generator=g, device=dev) * 0.02).to(**bf),
                               top_k=K, renormalize=True, shard=shard)
    lora = make_lora(S, E, R, H, I, torch.bfloat16, dev, g, ranks=[R] * S)
    layer = LoRAMoE(block, _Pool(lora), 0, groups, dispatcher="auto")
    x = torch.randn(T, H, generator=g, device=dev).bfloat16()
    seg = torch.tensor([0, T], dtype=torch.int32, device=dev)
    req = torch.tensor([0 if adapters else -1], dtype=torch.int32, device=dev)
    info = build_batch_info(seg, req, lora.slot_rank)
    with torch.no_grad():
        for _ in range(3):
            layer(x, info)  # Triton compiles, caches fill
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                layer(x, info)
            best = min(best, (time.perf_counter() - t0) / 20)
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            layer(x, info)
        end.record()
        torch.cuda.synchronize()
    return dict(T=T, adapters=adapters, host_us=round(best * 1e6, 1),
                wall_us=round(start.elapsed_time(end) * 1e3 / 20, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder of layer_host.jsonl")
    ap.add_argument("--label", default="new")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_host.jsonl"), "a") as f:
        for T in (1, 64, 512):
            for adapters in (0, 8):
                row = dict(label=args.label, **measure(T, adapters))
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
