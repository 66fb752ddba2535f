"""Per-stage times of one fused_moe_lora call (align, shrink, gate_up, down_shrink, down, top-k
sum) under the config the layer would run (tuned or heuristic), so the LoRA overhead can be
attributed to a kernel; and the whole layer under each LoRA switch. Used by
``bench_moe_lora.py --stages``."""

from __future__ import annotations

import dataclasses

import triton

from moelora_dist.kernels.align.ops import align_base_and_lora, align_items
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.kernels.moe_gemm.ops_fused import gate_up_lora
from moelora_dist.kernels.moe_lora.ops import config_for


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def stage_times(inp) -> dict:
    """Median ms of each launch of the call, in the order the pipeline issues them."""
    x, ids, lora = inp["x_TH"], inp["topk_ids_TK"], inp["lora"]
    ts, en = inp["token_slot_T"], inp["slot_enabled_S"]
    K = ids.shape[1]
    E = inp["w_gate_up_EXH"].shape[0]
    cfg = config_for(x, inp["w_gate_up_EXH"], K, lora)
    gkw = dict(block_n=cfg.block_n, block_k=cfg.block_k, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages, group_m=cfg.group_m)
    out = {}
    if lora is None:
        out["align_base"] = _bench(lambda: align_items(ids, None, None, None, None,
                                                       num_experts=E, block_m=cfg.block_m))
        base = align_items(ids, None, None, None, None, num_experts=E, block_m=cfg.block_m)
        gu = lambda: ops.gate_up(x, inp["w_gate_up_EXH"], base, K, **gkw)  # noqa: E731
        out["gate_up"] = _bench(gu)
        h, dsh = gu(), None
    else:
        ds_runs = cfg.down_shrink_runs_for(lora.max_rank)
        lkw = dict(gkw, lora_runs=cfg.lora_runs, fuse_down_shrink=cfg.fuse_down_shrink,
                   down_shrink_runs=ds_runs or 1)
        if cfg.fuse_shrink:
            def align():
                return align_items(ids, ts, en, lora.slot_rank, None, num_experts=E,
                                   block_m=cfg.block_m, mode="base", sort_by_slot=True)

            out["align_base_by_slot"] = _bench(align)
            base = align()
            gu = lambda: gate_up_lora(x, inp["w_gate_up_EXH"], base, K, ts, en, lora,  # noqa
                                      **lkw)
            out["gate_up_lora (shrink inside)"] = _bench(gu)
        else:
            def align():
                return align_base_and_lora(ids, ts, en, lora.slot_rank, lora.gate_up_a_shared,
                                           num_experts=E, block_m=cfg.block_m,
                                           lora_block_m=cfg.lora_block_m)

            out["align_base_and_lora"] = _bench(align)
            base, la = align()
            skw = dict(block_k=cfg.shrink_block_k, num_warps=cfg.shrink_num_warps,
                       split_k=cfg.shrink_split_k)
            out[f"lora_shrink (split {cfg.shrink_split_k})"] = _bench(
                lambda: ops.lora_shrink(x, lora, la, K, **skw))
            shrink = ops.lora_shrink(x, lora, la, K, **skw)
            gu = lambda: ops.gate_up(x, inp["w_gate_up_EXH"], base, K, ts, en, lora,  # noqa
                                     shrink, run_loop=cfg.run_loop, **lkw)
            out["gate_up" + (" (+ down shrink)" if cfg.fuse_down_shrink else "")] = _bench(gu)
        res = gu()
        if cfg.fuse_down_shrink:
            h, dsh = res
        else:
            h = res
            dshrink = lambda: ops.down_shrink(h, lora, base, K, ts, en,  # noqa: E731
                                              block_k=cfg.shrink_block_k, lora_runs=ds_runs)
            out["down_shrink"] = _bench(dshrink)
            dsh = dshrink()
    loop = dict(run_loop=cfg.run_loop, lora_runs=cfg.lora_runs) if lora is not None else {}

    def dn():
        return ops.down(h, inp["w_down_EHI"], inp["topk_weights_TK"], base, K, ts, en, lora,
                        dsh, **loop, **cfg.down_tiles())

    out["down"] = _bench(dn)
    o = dn()
    out["topk_sum"] = _bench(lambda: ops.topk_sum(o, ids, E))
    return out


def variant_times(inp, graph_timer=None) -> dict:
    """Median ms of the whole layer under tile and LoRA-switch variants of its config."""
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    K = inp["topk_ids_TK"].shape[1]
    lora = inp["lora"]
    base_cfg = config_for(inp["x_TH"], inp["w_gate_up_EXH"], K, lora)
    rep = dataclasses.replace
    variants = {"default": base_cfg,
                "bm64_n128_w4": rep(base_cfg, block_m=64, block_n=128, block_k=64, num_warps=4,
                                    num_stages=3),
                "bm128_n128_w8": rep(base_cfg, block_m=128, block_n=128, block_k=64,
                                     num_warps=8, num_stages=3)}
    if lora is not None:
        variants.update({
            "run_loop" if not base_cfg.run_loop else "slot_loop":
                rep(base_cfg, run_loop=not base_cfg.run_loop),
            "lora_runs1": rep(base_cfg, lora_runs=1),
            "down_shrink_per_slot": rep(base_cfg, down_shrink_runs=0),
            "lora_bm16": rep(base_cfg, lora_block_m=16),
            "n64": rep(base_cfg, block_n=64),
            "shrink_split4": rep(base_cfg, fuse_shrink=False, shrink_split_k=4),
            "fuse_down_shrink": rep(base_cfg, fuse_down_shrink=not base_cfg.fuse_down_shrink),
            "fuse_shrink": rep(base_cfg, fuse_shrink=True, run_loop=True, shrink_split_k=1),
            "fuse_both": rep(base_cfg, fuse_shrink=True, fuse_down_shrink=True, run_loop=True,
                             shrink_split_k=1)})
    timer = graph_timer or _bench
    out = {}
    for name, cfg in variants.items():
        try:
            out[name] = timer(lambda: fused_moe_lora(**inp, config=cfg.check()))
        except Exception as e:  # e.g. a tile that does not fit shared memory: record, go on
            out[name] = float("nan")
            print(f"variant {name} failed: {e!r}"[:300])
    return out
