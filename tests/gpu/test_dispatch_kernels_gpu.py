"""The dispatch kernels on one CUDA GPU against their references, bit for bit, and the
fixed-capacity dispatcher (EP 1) with the Triton experts under a CUDA graph.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
Packing copies bytes and the combine adds the same fp32 values in the same order and rounds to
nearest once, as PyTorch does, so every comparison is exact (the interpreter's bf16 rounding,
which the CPU test must allow for, is not involved here).
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _index_pack_unpack(kern, c, me, bypass):
    from moelora_dist.kernels.dispatch.wire import RowFormat, send_blocks

    fmt = RowFormat(c.x_nH.shape[1], c.topk_ids_nK.shape[1], c.x_nH.dtype)
    index = kern.dispatch_index(c.topk_ids_nK, c.num_local, c.num_dest, c.capacity,
                                c.overflow_capacity)
    P = c.num_dest
    buf = torch.full(((P + send_blocks(P, bypass)) * c.capacity, fmt.row_bytes), 0xA5,
                     dtype=torch.uint8, device="cuda")
    kern.pack_main(buf, fmt, c.x_nH, c.topk_weights_nK, c.topk_ids_nK, c.token_slot_n, index,
                   num_local_experts=c.num_local, capacity=c.capacity, me=me, bypass=bypass)
    return index, buf, kern.unpack_meta(buf, fmt)


def _check_all(c, bypass):
    from moelora_dist.kernels.dispatch import naive, ops

    g = torch.Generator(device="cuda").manual_seed(0)
    for me in sorted({0, c.num_dest - 1}):
        (i_ref, b_ref, m_ref), (i_got, b_got, m_got) = (
            _index_pack_unpack(k, c, me, bypass) for k in (naive, ops))
        for a, b in zip((*i_ref, b_ref, *m_ref), (*i_got, b_got, *m_got)):
            assert torch.equal(a, b)
        P, C, H = c.num_dest, c.capacity, c.x_nH.shape[1]
        rows_P = [max(0, int(n) - C) for n in i_ref.counts_P]
        y = torch.randn(P * C, H, device="cuda", generator=g).to(c.x_nH.dtype)
        back = torch.randn(max(P - 1, 1) * C if bypass else P * C, H, device="cuda",
                           generator=g).to(c.x_nH.dtype)
        ovf = (torch.randn(sum(rows_P), H, device="cuda", generator=g).to(c.x_nH.dtype)
               if sum(rows_P) else None)
        off = [sum(rows_P[:d]) for d in range(P)] if ovf is not None else None
        outs = [k.combine(torch.empty(c.x_nH.shape[0] + 1, H, dtype=c.x_nH.dtype, device="cuda"),
                          i_ref.pos_nP, y, back, ovf, off, capacity=C, me=me, bypass=bypass)
                for k in (naive, ops)]
        assert torch.equal(*outs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bypass", [True, False], ids=["bypass", "no-bypass"])
def test_kernels_match_references_on_every_case(bypass, dtype):
    from moelora_dist.testing.dispatch_cases import CASES, make_case

    for name in CASES:
        _check_all(make_case(name, dtype=dtype, device="cuda"), bypass)


@pytest.mark.parametrize("ep,cap_frac", [(2, 1.0), (8, 0.85), (8, 0.3)],
                         ids=["ep2-full", "ep8-rule", "ep8-overflow"])
def test_kernels_match_references_at_qwen3_shapes(ep, cap_frac):
    from moelora_dist.moe.router import route
    from moelora_dist.testing.dispatch_cases import DispatchCase

    g = torch.Generator(device="cuda").manual_seed(ep)
    n, H, E, K = 3000, 2048, 128, 8
    w, ids = route(torch.randn(n, E, device="cuda", generator=g), K, True)
    x = torch.randn(n, H, device="cuda", generator=g).to(torch.bfloat16)
    slot = torch.randint(-1, 8, (n,), device="cuda", dtype=torch.int32, generator=g)
    c = DispatchCase(x, w, ids, slot, E // ep, ep, max(1, int(cap_frac * n)))
    _check_all(c, bypass=True)


def test_fixed_dispatcher_layer_in_a_cuda_graph_matches_eager():
    # EP 1 on one GPU: pack, in-place receive rows (a strided x for the Triton experts),
    # unpack and combine, captured with the experts; the replay must equal eager exactly.
    from moelora_dist.moe.block import MoEBlock
    from moelora_dist.moe.layer import LoRAMoE
    from moelora_dist.parallel.groups import ParallelGroups
    from moelora_dist.testing import tiny

    cfg = tiny.TinyMoEConfig(hidden=256, intermediate=128, num_experts=16, top_k=4,
                             num_layers=1)
    g = ParallelGroups.single("cuda")
    shard = g.rank_layout.moe_shard(cfg.num_experts, cfg.intermediate)
    router, gu, down = (t.to("cuda", torch.bfloat16) for t in tiny.full_weights(cfg, 0))
    names = ["per_expert_r4", None, "shared_outer_r8", "down_only_r6"]
    adapters = {a.name: a for a in tiny.make_adapters(cfg)}
    outs = {}
    for disp in ("all_reduce", "all_to_all_fixed"):
        pool = tiny.make_pool(cfg, g.rank_layout, dtype=torch.bfloat16, device="cuda")
        base = MoEBlock.from_full(router, gu, down, top_k=cfg.top_k, renormalize=True,
                                  shard=shard)
        layer = LoRAMoE(base, pool, 0, g, disp)
        x, seg = tiny.make_requests(cfg, 300, names, 1, dtype=torch.bfloat16, device="cuda")
        info = tiny.batch_info_for(pool, names, adapters, seg)
        eager = layer(x, info)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, info)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = layer(x, info)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_graph, eager), disp
        outs[disp] = eager
        pool.release_batch()
    scale = float(outs["all_reduce"].float().abs().max())
    torch.testing.assert_close(outs["all_to_all_fixed"].float(), outs["all_reduce"].float(),
                               atol=2e-2 * scale, rtol=2e-2)
