"""All-to-all dispatch + combine against raw NCCL ``all_to_all_single`` of the same bytes.

    torchrun --standalone --nproc-per-node 2 benchmarks/dist/bench_dispatch.py \
        --out benchmarks/results/dist_dispatch.csv

Two ranks, ``tp = ep = 2``, E = 128, K = 8, bf16, random top-8 routing with adapter slots. The
expert step is the identity (the rows come back unchanged), so the timing is the dispatcher's
alone: split exchange, packing, the payload all-to-all, the return all-to-all and the
weighted sum at the origin (``gather=False``: tokens stay in their EP shares, as the
all-to-all moves them). ``ours_gather_us`` adds the all-gather that gives every TP rank all T
tokens again. ``static_us``: the fixed-capacity dispatcher (even splits, no host sync; its
bytes are ``static_MB_per_rank``); ``static_graph_us`` the same replayed from a CUDA graph
(its round trip is checked first). ``raw_us`` is two NCCL ``all_to_all_single`` calls with exactly our splits and
row sizes (dispatch bytes out, combine bytes back), with nothing else. A row reports no ratio
unless the dispatcher's output is right (identity experts: y = x * sum of top-k weights).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from benchmarks.common import env_columns
from benchmarks.dist.common import bench, capture, rank0, write_rows

from moelora_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moelora_dist.moe.dispatch.packing import row_layout
from moelora_dist.moe.dispatch.all_to_all_static import AllToAllStaticDispatcher
from moelora_dist.moe.router import route
from moelora_dist.parallel.groups import destroy_parallel, init_parallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", default="2048,4096")
    p.add_argument("--tokens", default="64,256,1024,4096,8192,16384,32768")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/dist_dispatch.csv")
    p.add_argument("--profile", action="store_true", help="print a profile at H 2048, T 4096")
    args = p.parse_args()
    groups = init_parallel(2, 2)
    E, K = args.experts, args.top_k
    shard = groups.rank_layout.moe_shard(E, 768)
    disp = AllToAllDispatcher(groups, shard)
    static = AllToAllStaticDispatcher(groups, shard)
    env = env_columns()
    rows = []
    try:
        for H in (int(h) for h in args.hidden.split(",")):
            for T in (int(t) for t in args.tokens.split(",")):
                g = torch.Generator(device="cuda").manual_seed(T + H)
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
                w, ids = route(torch.randn(T, E, device="cuda", generator=g), K, True)
                slot = torch.randint(-1, 8, (T,), device="cuda", dtype=torch.int32, generator=g)

                def identity(d):
                    keep = (d.topk_ids_NK >= 0).to(torch.float32)
                    return (d.x_NH.float() * (d.topk_weights_NK * keep).sum(1, keepdim=True)
                            ).to(x.dtype)

                d = static.dispatch(x, w, ids, slot)
                ok_static = torch.allclose(static.combine(identity(d), d).float(), x.float(),
                                           rtol=2e-2, atol=2e-2)
                d = disp.dispatch(x, w, ids, slot)
                y = disp.combine(identity(d), d)
                ok = torch.allclose(y.float(), x.float(), rtol=2e-2, atol=2e-2) and ok_static
                ok_t = torch.tensor([int(ok)], device="cuda")
                dist.all_reduce(ok_t, op=dist.ReduceOp.MIN)
                ok = bool(ok_t.item())
                h = d.handle
                send_rows, recv_rows = sum(h.send_splits), sum(h.recv_splits)
                row_bytes = row_layout(H, K, x.dtype)[1]  # x + weights + ids + slot, aligned
                send_buf = torch.empty(send_rows, row_bytes, dtype=torch.uint8, device="cuda")
                recv_buf = torch.empty(recv_rows, row_bytes, dtype=torch.uint8, device="cuda")
                y_recv = torch.empty(recv_rows, H, dtype=x.dtype, device="cuda")
                y_back = torch.empty(send_rows, H, dtype=x.dtype, device="cuda")

                def raw():
                    dist.all_to_all_single(recv_buf, send_buf, h.recv_splits, h.send_splits,
                                           group=groups.ep_group)
                    dist.all_to_all_single(y_back, y_recv, h.send_splits, h.recv_splits,
                                           group=groups.ep_group)

                def ours(gather, dispatcher=disp):
                    dd = dispatcher.dispatch(x, w, ids, slot)
                    dispatcher.combine(dd.x_NH, dd, gather=gather)

                if (H, T) == (2048, 4096) and args.profile:  # where the time goes, once
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU,
                                             ProfilerActivity.CUDA]) as prof:
                        ours(False)
                        torch.cuda.synchronize()
                    if rank0():
                        print(prof.key_averages().table(sort_by="cpu_time_total",
                                                        row_limit=25), flush=True)
                t_raw = bench(raw)
                t_ours = bench(lambda: ours(False))
                t_full = bench(lambda: ours(True))
                t_static = bench(lambda: ours(False, static))
                t_static_full = bench(lambda: ours(True, static))
                static_rows = 2 * (-(-T // 2))  # P x C rows per rank, P = 2
                # The static dispatcher has no data-dependent shape: capture it in a CUDA
                # graph (host launch cost gone), after checking the graphed round trip.
                t_graph, graph_ok = "", False
                try:
                    def round_trip():
                        dd = static.dispatch(x, w, ids, slot)
                        return static.combine(identity(dd), dd)

                    g_check, y_graph = capture(round_trip)
                    g_check.replay()
                    torch.cuda.synchronize()
                    graph_ok = torch.allclose(y_graph.float(), x.float(), rtol=2e-2, atol=2e-2)
                    del g_check, y_graph
                    g_time, _ = capture(lambda: ours(False, static))
                    t_graph = bench(g_time.replay)
                    del g_time
                except Exception as exc:  # reported, not hidden
                    if rank0():
                        print(f"graph capture failed at H={H} T={T}: {exc}", flush=True)
                torch.cuda.empty_cache()
                mb = send_rows * row_bytes / 1e6
                rows.append(dict(hidden=H, tokens=T, experts=E, top_k=K,
                                 dispatch_MB_per_rank=round(mb, 3),
                                 combine_MB_per_rank=round(send_rows * H * 2 / 1e6, 3),
                                 raw_us=round(t_raw * 1e6, 1), ours_us=round(t_ours * 1e6, 1),
                                 ours_gather_us=round(t_full * 1e6, 1),
                                 ratio=round(t_ours / t_raw, 3) if ok else "",
                                 ratio_gather=round(t_full / t_raw, 3) if ok else "",
                                 static_MB_per_rank=round(static_rows * row_bytes / 1e6, 3),
                                 static_us=round(t_static * 1e6, 1),
                                 static_gather_us=round(t_static_full * 1e6, 1),
                                 ratio_static=round(t_static / t_raw, 3) if ok else "",
                                 static_graph_us=round(t_graph * 1e6, 1) if t_graph else "",
                                 ratio_static_graph=(round(t_graph / t_raw, 3)
                                                     if t_graph and graph_ok and ok else ""),
                                 correct=ok, **env))
                if rank0():  # rewritten after every row: a killed run keeps what it measured
                    print(rows[-1], flush=True)
                    write_rows(args.out, rows)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
