"""Kernels on a CUDA GPU in bf16 at real sizes, and a decode step under a CUDA graph.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
Tolerance: bf16 stores ``h`` and per-pair outputs (8 bits of mantissa) and the LoRA expand
runs in tf32; the reference computes in fp32 from the same bf16 weights, so differences of a
few bf16 ulps of the output magnitude (~1) are expected.
"""

import pytest
import torch

from tests.conftest import effective_slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16_RTOL = 2e-2  # the absolute tolerance is this times the output's largest magnitude




def _case(name, T):
    from moelora_dist.testing.kernel_cases import make_case

    # Qwen3-30B-A3B expert sizes with 32 local experts (EP 4), K 8, ranks 64/32/0/64.
    return make_case(name, T=T, H=2048, E=32, I=768, K=8, R=64, dtype=torch.bfloat16,
                     device="cuda", seed=1)


@pytest.mark.parametrize("T", [5, 64, 700], ids=["T5", "T64", "T700"])
@pytest.mark.parametrize("case", ["mixed", "empty_expert", "one_expert", "t_lt_block",
                                  "no_lora_tokens", "all_invalid", "many_slots"])
def test_fused_moe_lora_bf16_matches_reference(case, T):
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora
    from moelora_dist.kernels.moe_lora.naive import experts_reference

    c = _case(case, T)
    args = (c["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"], c["topk_weights_TK"],
            c["topk_ids_TK"])
    got = fused_moe_lora(*args, c["token_slot_T"], c["lora"], "silu", c["slot_enabled_S"])
    want = experts_reference(*args, effective_slots(c), c["lora"])
    assert not torch.isnan(got).any()
    scale = max(1.0, float(want.float().abs().max()))
    torch.testing.assert_close(got.float(), want.float(), atol=BF16_RTOL * scale, rtol=BF16_RTOL)
    base = experts_reference(*args)
    if case == "mixed":  # the delta is large enough that dropping it would fail the check
        assert (want.float() - base.float()).abs().amax() > 0.2


@pytest.mark.parametrize("T", [1, 64, 256, 300], ids=["T1", "T64", "T256", "T300"])
@pytest.mark.parametrize("case", ["mixed", "no_lora_tokens"])
def test_align_and_batch_info_on_gpu(case, T):
    """One alignment at T <= 256 (top-8: up to 2048 pairs) takes the single-launch kernel,
    whose phases share one launch through block barriers and L2 atomics (the base + LoRA
    pair on both of its paths: four launches, or one of two blocks): each size runs with
    three seeds, so that a phase reading a stale counter would show."""
    from moelora_dist.kernels.align import naive as align_naive
    from moelora_dist.kernels.align import ops as align_ops
    from moelora_dist.kernels.align.ops import align_base_and_lora, align_items
    from moelora_dist.lora.batch_info import build_batch_info
    from moelora_dist.testing.kernel_cases import make_case

    assert (T * 8 <= align_ops.SINGLE_LAUNCH_MAX_ITEMS) == (T <= 256)
    shipped = align_ops.SINGLE_LAUNCH_PAIRS
    try:
        for pairs in (False, True):  # the pair in four launches, then in one
            align_ops.SINGLE_LAUNCH_PAIRS = pairs
            for seed in (1, 2, 3):
                c = make_case(case, T=T, H=2048, E=32, I=768, K=8, R=64,
                              dtype=torch.bfloat16, device="cuda", seed=seed)
                _check_alignments(c, align_naive, align_items, align_base_and_lora)
    finally:
        align_ops.SINGLE_LAUNCH_PAIRS = shipped
    seg = torch.tensor([0, 10, 10, 200, 300], dtype=torch.int32, device="cuda")
    req = torch.tensor([1, -1, 0, 3], dtype=torch.int32, device="cuda")
    got = build_batch_info(seg, req, c["lora"].slot_rank, backend="triton")
    want = build_batch_info(seg, req, c["lora"].slot_rank, backend="torch")
    assert torch.equal(got.token_slot_T, want.token_slot_T)
    assert torch.equal(got.slot_enabled_S, want.slot_enabled_S)


def _check_alignments(c, align_naive, align_items, align_base_and_lora):
    lora = c["lora"]
    a = (c["topk_ids_TK"], c["token_slot_T"], c["slot_enabled_S"], lora.slot_rank,
         lora.gate_up_a_shared)
    for mode, by_slot in [("base", True), ("lora", False)]:
        got = align_items(*a, num_experts=32, block_m=16, mode=mode, sort_by_slot=by_slot)
        want = align_naive.align_items(*a, num_experts=32, block_m=16, mode=mode,
                                       sort_by_slot=by_slot)
        assert int(got.num_post_pad) == int(want.num_post_pad)
        assert torch.equal(got.block_bucket, want.block_bucket)
        assert torch.equal(got.sorted_ids.sort().values, want.sorted_ids.sort().values)
    pair = align_base_and_lora(*a, num_experts=32, block_m=64, lora_block_m=16)
    for got, mode, by_slot, bm in zip(pair, ["base", "lora"], [True, False], [64, 16]):
        want = align_naive.align_items(*a, num_experts=32, block_m=bm, mode=mode,
                                       sort_by_slot=by_slot)
        assert int(got.num_post_pad) == int(want.num_post_pad)
        assert torch.equal(got.block_bucket, want.block_bucket)
        assert torch.equal(got.sorted_ids.sort().values, want.sorted_ids.sort().values)


def test_decode_step_in_cuda_graph_matches_eager():
    """Capture one decode step for a fixed T, then replay with new slots, -1 tokens and -1
    experts copied into the static inputs; every replay equals the eager call."""
    from moelora_dist.kernels.moe_lora.ops import fused_moe_lora

    T = 48
    c = _case("mixed", T)
    lora, E, K = c["lora"], 32, 8
    static = {k: c[k].clone() for k in ("x_TH", "topk_weights_TK", "topk_ids_TK",
                                         "token_slot_T", "slot_enabled_S")}

    def step():
        return fused_moe_lora(static["x_TH"], c["w_gate_up_EXH"], c["w_down_EHI"],
                              static["topk_weights_TK"], static["topk_ids_TK"],
                              static["token_slot_T"], lora, "silu", static["slot_enabled_S"])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()

    g = torch.Generator(device="cuda").manual_seed(7)
    for trial in range(3):
        static["x_TH"].copy_(torch.randn(T, 2048, device="cuda", generator=g).bfloat16())
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
        ids[torch.rand(T, K, device="cuda", generator=g) < 0.25] = -1
        static["topk_ids_TK"].copy_(ids.int())
        slots = torch.randint(-1, 4, (T,), device="cuda", generator=g).int()
        slots[: trial * 8] = -1
        static["token_slot_T"].copy_(slots)
        static["slot_enabled_S"].copy_(torch.tensor([True, trial != 1, False, trial == 2],
                                                    device="cuda"))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        # Bitwise: the default config has no atomics on the data path (the down shrink runs
        # apart), and the replay computes the same blocks in the same order as eager.
        assert torch.equal(y_static, eager), (y_static.float() - eager.float()).abs().max()


@pytest.mark.parametrize("T", [64, 5])
def test_dense_lora_bf16_matches_token_loop(T):
    """The dense-LoRA Triton kernels on CUDA in bf16 against the fp64 token loop on the same
    bf16 factors, with q/k/v-like groups of three modules. Bounds: into an fp32 output only
    TF32 rounds in the expand (the fp32 shrink to 10 mantissa bits, ~5e-4 relative), so 2e-3
    of the largest delta; into a bf16 output one more rounding (2^-8), so 1e-2."""
    from moelora_dist.kernels.dense_lora import ops
    from moelora_dist.testing.references import dense_lora_token_loop

    g = torch.Generator(device="cuda").manual_seed(5)
    S, R, I = 8, 16, 2048
    outs = (512, 128, 128)
    a = [(torch.randn(S, R, I, generator=g, device="cuda") * 0.05).bfloat16() for _ in outs]
    b = [(torch.randn(S, o, R, generator=g, device="cuda") * 0.05).bfloat16() for o in outs]
    rank = torch.tensor([16, 8, 16, 0, 16, 4, 16, 16], dtype=torch.int32, device="cuda")
    slot_T = torch.tensor([(t % (S + 1)) - 1 for t in range(T)], dtype=torch.int32,
                          device="cuda")
    x = torch.randn(T, I, generator=g, device="cuda").bfloat16()
    eff = torch.where((slot_T >= 0) & (rank[slot_T.clamp(min=0).long()] > 0), slot_T, -1)
    for dtype, bound in ((torch.float32, 2e-3), (torch.bfloat16, 1e-2)):
        ys = [torch.zeros(T, o, dtype=dtype, device="cuda") for o in outs]
        ops.add_dense_lora(ys, x, a, b, slot_T, rank)
        for y, aj, bj in zip(ys, a, b):
            masked_a = aj.clone()
            for s_, r in enumerate(rank.tolist()):
                masked_a[s_, r:] = 0
            want = dense_lora_token_loop(x, masked_a, bj, eff)
            err = (y.float() - want).abs().max().item()
            assert err <= bound * want.abs().max().item(), (dtype, err)
            assert (y[eff < 0] == 0).all()


@pytest.mark.parametrize("T", [1, 64])
def test_dense_lora_side_stream_equals_one_stream_eager_and_in_a_graph(T, monkeypatch):
    """``DenseLoRA.begin`` runs the shrink on a side stream beside the base GEMM: the outputs
    equal the one-stream order bit for bit, eagerly and replayed from a CUDA graph captured
    with the fork and join inside (q/k/v-shaped group, 8 slots, some tokens without one)."""
    from types import SimpleNamespace

    from moelora_dist.models import lora_linear

    g = torch.Generator(device="cuda").manual_seed(7)
    S, R, H = 8, 16, 2048
    outs = (4096, 512, 512)
    bufs = {f"m{j}": SimpleNamespace(
        a=(torch.randn(S, R, H, generator=g, device="cuda") * 0.05).bfloat16(),
        b=(torch.randn(S, o, R, generator=g, device="cuda") * 0.05).bfloat16())
        for j, o in enumerate(outs)}
    rank = torch.full((S,), R, dtype=torch.int32, device="cuda")
    pool = SimpleNamespace(dense_buffers=bufs.__getitem__, slot_rank_S=rank)
    # token 0 has slot 0 (at T = 1 the only token), every ninth has none
    slot_T = torch.tensor([((t + 1) % (S + 1)) - 1 for t in range(T)], dtype=torch.int32,
                          device="cuda")
    info = SimpleNamespace(token_slot_T=slot_T, slot_enabled_S=rank > 0)
    w = (torch.randn(sum(outs), H, generator=g, device="cuda") * 0.02).bfloat16()
    x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    mods = [(f"m{j}", None) for j in range(3)]

    def step():
        lora = lora_linear.DenseLoRA(pool, info, "triton")
        pending = lora.begin(x, mods)
        qkv = torch.nn.functional.linear(x, w)
        return torch.cat(pending.finish(list(qkv.split(outs, dim=1))), dim=1)

    monkeypatch.setattr(lora_linear, "OVERLAP_MAX_TOKENS", 0)
    one_stream = step()
    monkeypatch.setattr(lora_linear, "OVERLAP_MAX_TOKENS", 512)
    side = step()
    torch.cuda.synchronize()
    assert torch.equal(side, one_stream)
    assert (side != torch.nn.functional.linear(x, w)).any()  # the deltas are there
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up off the default stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, one_stream)


@pytest.mark.parametrize("E,K,renorm", [(128, 8, True), (8, 2, True), (64, 8, False),
                                        (32, 4, False)])
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_router_kernel_matches_torch_topk_on_cuda(E, K, renorm, T):
    """bf16 logits tie often, at the boundary too: the kernel keeps the set CUDA
    ``torch.topk`` keeps (the lowest ids among equal scores), each with its weight; and a CUDA
    graph replay of the kernel equals its eager call."""
    from moelora_dist.kernels.router import naive, ops

    g = torch.Generator(device="cuda").manual_seed(E + T)
    x = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
    x[:, E // 2] = x[:, 0]  # a guaranteed tie in every row
    # the top-k-then-softmax weights are rounded to bf16 (as transformers): one ulp apart
    for got, want, rtol in ((ops.softmax_topk(x, K, renorm), naive.softmax_topk(x, K, renorm),
                             1e-5),
                            (ops.topk_softmax(x, K), naive.topk_softmax(x, K), 8e-3)):
        (w, ids), (w_ref, ids_ref) = got, want
        assert torch.equal(ids.sort(1).values, ids_ref.sort(1).values)
        by = lambda w_, i_: torch.zeros(T, E, device="cuda").scatter_(1, i_.long(), w_)  # noqa: E731
        torch.testing.assert_close(by(w, ids), by(w_ref, ids_ref), rtol=rtol, atol=1e-7)
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    ops.softmax_topk(static, K, renorm)  # compile outside the capture
    with torch.cuda.graph(graph):
        out = ops.softmax_topk(static, K, renorm)
    static.copy_(torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16))
    graph.replay()
    fresh = ops.softmax_topk(static, K, renorm)
    assert torch.equal(out[0], fresh[0]) and torch.equal(out[1], fresh[1])


@pytest.mark.parametrize("T", [1, 64])
def test_fused_expand_consumers_match_the_expand_launch_and_replay(T):
    """``lora_linear.FUSE_EXPAND``'s kernels at Qwen3-30B-A3B's attention shapes (32 query /
    4 kv heads of 128, hidden 2048, 8 slots of rank 16, side-stream shrink): the page write
    with the q/k/v expand and the residual add + norm with o's equal the expand launch
    followed by the plain kernels (TF32 in the expand against fp32 here: 1e-2 of the largest
    value), and a CUDA-graph replay of the fused pair equals its eager call bit for bit."""
    from types import SimpleNamespace

    from moelora_dist.kernels.norm import ops as norm_ops
    from moelora_dist.kernels.paged_attention import ops as pa_ops
    from moelora_dist.kernels.paged_attention.naive import rope_tables
    from moelora_dist.models import lora_linear

    g = torch.Generator(device="cuda").manual_seed(11)
    S, R, H, Nq, Nk, D = 8, 16, 2048, 32, 4, 128
    outs = {"q": Nq * D, "k": Nk * D, "v": Nk * D, "o": H}
    ins = {"q": H, "k": H, "v": H, "o": Nq * D}
    bufs = {m: SimpleNamespace(
        a=(torch.randn(S, R, ins[m], generator=g, device="cuda") * 0.05).bfloat16(),
        b=(torch.randn(S, o, R, generator=g, device="cuda") * 0.05).bfloat16())
        for m, o in outs.items()}
    rank = torch.tensor([16, 8, 16, 0, 16, 4, 16, 16], dtype=torch.int32, device="cuda")
    pool = SimpleNamespace(dense_buffers=bufs.__getitem__, slot_rank_S=rank)
    slot_T = torch.tensor([((t + 1) % (S + 1)) - 1 for t in range(T)], dtype=torch.int32,
                          device="cuda")
    info = SimpleNamespace(token_slot_T=slot_T, slot_enabled_S=rank > 0)
    x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    qkv0 = torch.randn(T, (Nq + 2 * Nk) * D, generator=g, device="cuda").bfloat16()
    attn = torch.randn(T, Nq * D, generator=g, device="cuda").bfloat16()
    o0 = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    h0 = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    wn = torch.ones(H, device="cuda").bfloat16()
    qn = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).bfloat16()
    cos, sin = (t.cuda() for t in rope_tables(D, 1e6, 1024))
    pos = torch.arange(T, device="cuda") + 500
    page_slots = torch.arange(T, device="cuda") * 3
    pages = [torch.zeros(T * 3 // 16 + 2, 16, Nk, D, device="cuda").bfloat16() for _ in "kv"]
    qkv_mods = [("q", None), ("k", None), ("v", None)]

    def step(fuse: bool):
        lora = lora_linear.DenseLoRA(pool, info, "triton")
        h = h0.clone()
        qkv = qkv0.clone()
        q, k, v = (t.view(T, -1, D) for t in qkv.split([Nq * D, Nk * D, Nk * D], dim=1))
        pending = lora.begin(x, qkv_mods)
        if fuse:
            q_out = pa_ops.rope_write(q, k, v, pos, cos, sin, page_slots, *pages, qn, qn,
                                      1e-6, lora=pending.token_lora())
            pend_o = lora.begin(attn, [("o", None)])
            out = norm_ops.add_rms_norm(h, o0, wn, 1e-6, lora=pend_o.token_lora())
        else:
            pending.finish([q.view(T, -1), k.view(T, -1), v.view(T, -1)])
            q_out = pa_ops.rope_write(q, k, v, pos, cos, sin, page_slots, *pages, qn, qn, 1e-6)
            o = lora.begin(attn, [("o", None)]).finish([o0.clone()])[0]
            out = norm_ops.add_rms_norm(h, o, wn, 1e-6)
        return q_out, out, h, pages[0].clone(), pages[1].clone()

    plain = step(False)
    fused = step(True)
    torch.cuda.synchronize()
    for a_, b_ in zip(fused, plain):
        err = (a_.float() - b_.float()).abs().max().item()
        assert err <= 1e-2 * b_.float().abs().max().item(), err
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(True)
    graph.replay()
    torch.cuda.synchronize()
    for a_, b_ in zip(static, fused):
        assert torch.equal(a_, b_)


@pytest.mark.parametrize("T", [1, 64, 2048])
def test_fused_topk_sum_norm_is_bitwise_on_cuda(T):
    """``models.model.FUSE_TOPK_SUM``'s kernel at Qwen3-30B-A3B's shape (top-8, hidden 2048,
    bf16): the same bits as ``topk_sum`` then ``add_rms_norm``, with pairs of invalid
    experts left as NaN."""
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops
    from moelora_dist.kernels.moe_gemm.pairs import PairOutputs
    from moelora_dist.kernels.norm import ops as norm_ops

    g = torch.Generator(device="cuda").manual_seed(3)
    K, E, H = 8, 128, 2048
    ids = torch.randint(-1, E, (T, K), generator=g, device="cuda").int()
    out = torch.randn(T * K, H, generator=g, device="cuda").bfloat16()
    out[(ids < 0).reshape(-1)] = float("nan")
    h0 = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).bfloat16()
    h_want = h0.clone()
    want = norm_ops.add_rms_norm(h_want, gemm_ops.topk_sum(out, ids, E), w, 1e-6)
    h = h0.clone()
    got = norm_ops.add_topk_rms_norm(h, PairOutputs(out, ids, E), w, 1e-6)
    torch.cuda.synchronize()
    assert torch.equal(h, h_want) and torch.equal(got, want)
    shared = torch.randn(T, H, generator=g, device="cuda").bfloat16()  # shared experts
    h_want = h0.clone()
    want = norm_ops.add_rms_norm(h_want, gemm_ops.topk_sum(out, ids, E) + shared, w, 1e-6)
    h = h0.clone()
    got = norm_ops.add_topk_rms_norm(h, PairOutputs(out, ids, E, shared), w, 1e-6)
    torch.cuda.synchronize()
    assert torch.equal(h, h_want) and torch.equal(got, want)
