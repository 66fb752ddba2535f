"""Cost of swapping an adapter into a LoRA pool slot, and of preparing a batch.

Shapes of Qwen3-30B-A3B MoE layers (H=2048, E=128, I=768, its public configuration), a few layers (the
cost is per layer; a 48-layer model costs 48/L times the reported load), mocked ranks of
several layouts. Run on a GPU (the device tool) or a CPU:

    PYTHONPATH=$PWD python3 benchmarks/pool/bench_pool_load.py --device cuda --out benchmarks/results

For each (layout, rank, source) it times ``pool.load`` of a fresh adapter into a full pool
(so each load evicts: validation, slicing, zeroing the slot, copying in) and, separately,
``stage_adapter`` (validation and slicing only). The source is the adapter as a loader hands
it over (fp32 on the CPU) or already on the device in bf16. Each load is checked against the
adapter before it is timed. Writes ``pool_load_<device>.csv`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm

from benchmarks.common import device_tag, env_columns, write_csv
from moelora_dist.adapters.canonical import CanonicalAdapter
from moelora_dist.lora.pool import LoRAPool, MoELayerSpec, PoolConfig
from moelora_dist.lora.pool_write import stage_adapter
from moelora_dist.testing.simulate import random_moe_lora
from moelora_dist.parallel.layout import Layout, RankLayout

H, E, I = 2048, 128, 768
LAYOUTS = [(1, 1, 1), (8, 8, 8), (8, 8, 2)]  # (world, tp, ep); rank 0 of each is measured


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _adapter(name, rank, layers, source_device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    moe = {}
    for i in range(layers):
        layer = random_moe_lora(E, H, I, rank, g, dtype=torch.float32)
        for f in layer.projections().values():
            f.a, f.b = f.a.to(source_device, dtype), f.b.to(source_device, dtype)
        moe[i] = layer
    return CanonicalAdapter(name, moe=moe)


def _check(pool, adapter, slot):
    """The slot holds this rank's slice of the adapter (first layer, gate A and down B)."""
    buf, shard = pool.moe_buffers(0), pool.moe_shard(0)
    layer = adapter.moe[0]
    r = layer.gate.rank
    es = slice(shard.expert_start, shard.expert_end)
    dt = buf.gate_up_a.dtype
    ok = torch.equal(buf.gate_up_a[slot, :, :r].cpu(), layer.gate.a[es].to(dt).cpu())
    want_b = (layer.down.b[es].cpu().float() * layer.down.scaling).to(dt)
    ok &= torch.equal(buf.down_b[slot, :, :, :r].cpu(), want_b)
    ok &= not bool(buf.gate_up_a[slot, :, r:buf.max_rank].any())
    return bool(ok)


def bench(args):
    rows = []
    dev = args.device
    cases = [(lay, r, src) for lay in LAYOUTS for r in args.ranks for src in ("cpu", dev)]
    cases = list(dict.fromkeys(cases))
    for (world, tp, ep), rank, src in tqdm(cases, desc="pool load", unit="case"):
        rl = RankLayout(Layout(world, tp, ep), 0)
        specs = {i: MoELayerSpec(E, H, I) for i in range(args.layers)}
        cfg = PoolConfig(max_loras=args.slots, max_rank=max(args.ranks), dtype=torch.bfloat16,
                         device=dev)
        pool = LoRAPool(cfg, rl, specs)
        src_dtype = torch.float32 if src == "cpu" else torch.bfloat16
        ads = [_adapter(f"a{k}", rank, args.layers, src, src_dtype, k)
               for k in range(args.slots + 1)]
        for a in ads[:args.slots]:
            pool.load(a)  # fill: every timed load evicts
        load_ms, stage_ms, ok = [], [], True
        for rep in range(args.repeats):
            # round robin over S+1 adapters with S LRU slots: every load is a miss
            a = ads[(args.slots + rep) % len(ads)]
            assert pool.slot_of(a.name) is None
            _sync(dev)
            t0 = time.perf_counter()
            slot = pool.load(a)
            _sync(dev)
            load_ms.append((time.perf_counter() - t0) * 1e3)
            ok &= _check(pool, a, slot)
            t0 = time.perf_counter()
            stage_adapter(a, rl, cfg.max_rank, False, specs, {i: pool.moe_shard(i) for i in specs}, {})
            _sync(dev)
            stage_ms.append((time.perf_counter() - t0) * 1e3)
        slot_bytes = sum(t[0].numel() * t.element_size()
                         for b in (pool.moe_buffers(i) for i in specs)
                         for t in (b.gate_up_a, b.gate_up_b, b.down_a, b.down_b))
        src_bytes = sum(t.numel() * t.element_size() for layer in ads[0].moe.values()
                        for f in layer.projections().values() for t in (f.a, f.b))
        ms = statistics.median(load_ms)
        rows.append(dict(
            layout=f"w{world}-tp{tp}-ep{ep}", rank=rank, layers=args.layers, source=src,
            source_dtype=str(src_dtype).replace("torch.", ""), ok=ok,
            load_ms=round(ms, 3), stage_ms=round(statistics.median(stage_ms), 3),
            load_ms_per_layer=round(ms / args.layers, 3),
            slot_mib=round(slot_bytes / 2 ** 20, 2), source_mib=round(src_bytes / 2 ** 20, 2),
            slot_write_gbps=round(slot_bytes / (ms * 1e-3) / 1e9, 2),
        ))
        del pool, ads
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/current")
    args = p.parse_args(argv)
    rows = bench(args)
    meta = env_columns()
    path = os.path.join(args.out, f"pool_load_{device_tag(meta)}.csv")
    write_csv(path, rows, meta)
    for r in rows:
        print(r)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
