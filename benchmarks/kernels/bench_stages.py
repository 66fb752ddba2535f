"""Per-stage times of one fused_moe_lora call (align, shrink, gate_up, down, top-k sum), so the
LoRA overhead can be attributed to a kernel. Used by ``bench_moe_lora.py --stages``."""

from __future__ import annotations

import triton

from moelora_dist.kernels.align.ops import align_base_and_lora, align_items
from moelora_dist.kernels.moe_lora.configs import pick_config
from moelora_dist.kernels.moe_gemm import ops


def stage_times(inp) -> dict:
    """Median ms of each stage for the inputs of one benchmark case (LoRA if present)."""
    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    x, ids, lora = inp["x_TH"], inp["topk_ids_TK"], inp["lora"]
    ts, en = inp["token_slot_T"], inp["slot_enabled_S"]
    T, K = ids.shape
    E = inp["w_gate_up_EXH"].shape[0]
    cfg = pick_config(T, K, E, lora.num_slots if lora is not None else 1)
    has = lora is not None
    rank = lora.slot_rank if has else None
    out = {}

    if has:
        def align():
            return align_base_and_lora(ids, ts, en, rank, lora.gate_up_a_shared,
                                       num_experts=E, block_m=cfg.block_m,
                                       lora_block_m=cfg.lora_block_m)

        out["align_base_and_lora"] = bench(align)
        base, la = align()
        out["lora_shrink"] = bench(
            lambda: ops.lora_shrink(x, lora, la, K, block_k=cfg.shrink_block_k))
        shrink = ops.lora_shrink(x, lora, la, K, block_k=cfg.shrink_block_k)
    else:
        def align():
            return align_items(ids, None, None, None, None, num_experts=E,
                               block_m=cfg.block_m, mode="base")

        out["align_base"] = bench(align)
        base, shrink = align(), None
    loop = dict(run_loop=cfg.run_loop, lora_runs=cfg.lora_runs)
    gkw = dict(block_n=cfg.block_n, block_k=cfg.block_k, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)

    def gu():
        return ops.gate_up(x, inp["w_gate_up_EXH"], base, K, ts, en, lora, shrink, **gkw, **loop)

    out["gate_up"] = bench(gu)
    h, dsh = gu(), None
    if has:
        ds_runs = cfg.down_shrink_runs_for(lora.max_rank)

        def dshrink():
            return ops.down_shrink(h, lora, base, K, ts, en, block_k=cfg.shrink_block_k,
                                   lora_runs=ds_runs)

        out["down_shrink"] = bench(dshrink)
        dsh = dshrink()
    dkw = dict(gkw, block_n=cfg.down_block_n)

    def dn():
        return ops.down(h, inp["w_down_EHI"], inp["topk_weights_TK"], base, K, ts, en, lora,
                        dsh, **dkw, **loop)

    out["down"] = bench(dn)
    o = dn()
    out["topk_sum"] = bench(lambda: ops.topk_sum(o, ids, E))
    return out


def variant_times(inp, graph_timer=None) -> dict:
    """Median ms of the whole layer under tile/fusion variants (before/after notes)."""
    import dataclasses

    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    T, K = inp["topk_ids_TK"].shape
    E = inp["w_gate_up_EXH"].shape[0]
    lora = inp["lora"]
    base_cfg = pick_config(T, K, E, lora.num_slots if lora is not None else 1)
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
            "n64": rep(base_cfg, block_n=64)})
    timer = graph_timer or (lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40,
                                                               return_mode="median"))
    out = {}
    for name, cfg in variants.items():
        try:
            out[name] = timer(lambda: fused_moe_lora(**inp, config=cfg))
        except Exception as e:  # e.g. a tile that does not fit shared memory: record, go on
            out[name] = float("nan")
            print(f"variant {name} failed: {e!r}"[:300])
    return out
