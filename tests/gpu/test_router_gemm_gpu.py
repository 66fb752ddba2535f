"""The router GEMM fused with the softmax top-k (``kernels.router.ops.gemm_softmax_topk``) on a
CUDA GPU at Qwen3-30B-A3B's router (H 2048, E 128, top-8, bf16), against the path it replaces:
cuBLAS's GEMM (``F.linear``), then the top-k launch; eager, and in a CUDA graph replayed twice.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.

Tolerance: both sides round a sum of the same fp32 products to bf16 once, in another order, so
a logit may land one bf16 ulp away where the sum sits next to a rounding boundary (rare). Rows
are drawn so that the 9 largest exact logits are at least 4 ulps apart, so such a difference
cannot reorder them: ids must be equal. Weights: equal to fp32 rounding on rows whose logits
came out equal; elsewhere one ulp of a logit (1/32 in [4, 8), 1/16 in [8, 16)) moves a weight
by up to ~6.5%.
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

H, E, K = 2048, 128, 8


def _bf16_ulp(v):
    """The spacing of bf16 numbers at ``|v|`` (8 significant bits)."""
    _, exp = torch.frexp(v.float().abs())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), exp - 8)


def _separated_rows(T, w, g, pool_rows=8192):
    """``[T, H]`` bf16 rows whose top K + 1 exact logits are at least 4 bf16 ulps apart."""
    pool = torch.randn(pool_rows, H, device="cuda", generator=g).to(torch.bfloat16)
    exact = F.linear(pool.float(), w.float())
    top = exact.topk(K + 1, dim=1).values
    clear = ((top[:, :-1] - top[:, 1:]) >= 4 * _bf16_ulp(top[:, :-1])).all(dim=1)
    assert int(clear.sum()) >= T, "too few separated rows: draw a larger pool"
    return pool[clear][:T].contiguous()


def _router(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # logits of std ~1.8, as large as ~8.6 in 8192 rows (ulp 1/16 from 8 on)
    return (torch.randn(E, H, device="cuda", generator=g) * 0.04).to(torch.bfloat16), g


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("T", [1, 16, 64])
def test_fused_router_gemm_matches_cublas_then_topk(T, renorm):
    from moelora_dist.kernels.router import ops
    from moelora_dist.moe import router

    w, g = _router(T)
    x = _separated_rows(T, w, g)
    assert router.fused_gemm_applies(x, w)
    logits = torch.empty(T, E, device="cuda", dtype=torch.bfloat16)
    got_w, got_ids = ops.gemm_softmax_topk(x, w, K, renorm, logits)
    ref_logits = F.linear(x, w)
    want_w, want_ids = ops.softmax_topk(ref_logits, K, renorm)
    assert torch.equal(got_ids, want_ids)

    exact = F.linear(x.float(), w.float())
    off = (logits.float() - exact).abs() - _bf16_ulp(exact)
    assert float(off.max()) <= 1e-4, "a fused logit is more than one ulp from the exact sum"
    assert float((logits != ref_logits).float().mean()) < 0.01
    same = (logits == ref_logits).all(dim=1)
    torch.testing.assert_close(got_w[same], want_w[same], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_w, want_w, rtol=7e-2, atol=1e-6)

    # the chunks finish in whatever order the GPU runs them: the same bits every time
    for _ in range(10):
        again = ops.gemm_softmax_topk(x, w, K, renorm)
        assert torch.equal(again[0], got_w) and torch.equal(again[1], got_ids)
    assert torch.equal(router.route_from_hidden(x, w, K, renorm)[1], got_ids)
    torch.cuda.synchronize()
    assert int(ops._counters[x.device].abs().sum()) == 0


@pytest.mark.parametrize("T", [1, 16, 64])
def test_fused_router_gemm_in_a_cuda_graph_replayed_twice(T):
    from moelora_dist.kernels.router import ops

    w, g = _router(100 + T)
    xs = [_separated_rows(T, w, g) for _ in range(2)]
    static = xs[0].clone()
    ops.gemm_softmax_topk(static, w, K, True)  # compile and allocate the counters outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.gemm_softmax_topk(static, w, K, True)
    for x in xs:
        static.copy_(x)
        graph.replay()
        eager = ops.gemm_softmax_topk(x, w, K, True)
        unfused = ops.softmax_topk(F.linear(x, w), K, True)
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
        assert torch.equal(out[1], unfused[1])
    assert int(ops._counters[static.device].abs().sum()) == 0


def test_a_capture_without_counters_takes_the_unfused_path(monkeypatch):
    from moelora_dist.kernels.router import ops

    w, g = _router(7)
    x = _separated_rows(16, w, g)
    ops.gemm_softmax_topk(x, w, K, True)  # compile both paths outside the capture
    want = ops.softmax_topk(F.linear(x, w), K, True)
    monkeypatch.setattr(ops, "_counters", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.gemm_softmax_topk(x, w, K, True)
    assert ops._counters == {}, "counters were allocated inside the capture"
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
