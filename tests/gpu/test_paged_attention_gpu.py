"""The paged-attention kernels, the rope write and the fused add + RMSNorm on the GPU in bf16
and fp16 against their references (fp32 math), at Qwen3-30B-A3B's attention shape (32 q / 4 kv
heads of 128, pages of 16): decode over ragged lengths, prefill chunks after cached keys,
pages scattered over the pool, a sliding window; NaN in every page slot no sequence owns.

Run with the device tool: ``PYTHONPATH=$PWD python3 -m pytest tests/gpu -m gpu -q``.
The split decode's merge in the attention launch (``COMBINE_FUSED``) is checked bit for bit
against the combine launch, eager and in a CUDA graph.
Tolerance: bf16 inputs, fp32 softmax in both; the kernel rounds the probabilities to bf16
before P.V (as flash attention does): within 2e-2 of the largest output.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _case(seqs, Nq, Nk, D, S, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-L // S) for _, L in seqs]
    P = sum(need) + 7
    kp = torch.full((P, S, Nk, D), float("nan"), dtype=dtype, device="cuda")
    vp = kp.clone()
    order = torch.randperm(P, generator=g, device="cuda").tolist()
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32, device="cuda")
    used = 0
    for b, (_, L) in enumerate(seqs):
        pages = order[used:used + need[b]]
        used += need[b]
        tables[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        idx = torch.tensor(pages, dtype=torch.long, device="cuda")
        k = torch.randn(len(pages) * S, Nk, D, generator=g, device="cuda").to(dtype)
        v = torch.randn(len(pages) * S, Nk, D, generator=g, device="cuda").to(dtype)
        k[L:], v[L:] = float("nan"), float("nan")  # the stale tail of the last page
        kp[idx] = k.view(len(pages), S, Nk, D)
        vp[idx] = v.view(len(pages), S, Nk, D)
    seg = [0]
    for q, _ in seqs:
        seg.append(seg[-1] + q)
    q = torch.randn(seg[-1], Nq, D, generator=g, device="cuda").to(dtype)
    i32 = dict(dtype=torch.int32, device="cuda")
    return q, kp, vp, tables, torch.tensor([L for _, L in seqs], **i32), torch.tensor(seg, **i32)


G = torch.Generator().manual_seed(1)
CASES = {
    "decode_B64_ragged": [(1, int(n)) for n in torch.randint(1, 700, (64,), generator=G)],
    "prefill_chunks": [(512, 512), (300, 1100), (1, 37), (77, 600), (1, 1)],
    "mixed_small": [(1, 640), (5, 5), (1, 17), (16, 48), (0, 0), (1, 0)],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 128], ids=["full", "window128"])
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_gpu_matches_reference(name, window, dtype):
    from moelora_dist.kernels.paged_attention import naive, ops

    seqs = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, 32, 4, 128, 16, dtype)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=128 ** -0.5,
                                 sliding_window=window)
    got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=128 ** -0.5,
                              sliding_window=window,
                              decode_only=all(n == 1 for n, _ in seqs))
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2e-2 * want.float().abs().max().item(), err


@pytest.mark.parametrize("head_norm", [False, True], ids=["no_norm", "head_norm"])
def test_rope_write_and_norm_gpu_bf16(head_norm):
    from moelora_dist.kernels.norm import naive as norm_naive
    from moelora_dist.kernels.norm import ops as norm_ops
    from moelora_dist.kernels.paged_attention import naive, ops

    g = torch.Generator(device="cuda").manual_seed(2)
    T, Nq, Nk, D, P, S = 300, 32, 4, 128, 40, 16
    bf = dict(dtype=torch.bfloat16, device="cuda")
    qkv = torch.randn(T, (Nq + 2 * Nk) * D, generator=g, device="cuda").bfloat16()
    q = qkv[:, :Nq * D].view(T, Nq, D)
    k = qkv[:, Nq * D:(Nq + Nk) * D].view(T, Nk, D)
    v = qkv[:, (Nq + Nk) * D:].view(T, Nk, D)
    pos = torch.randint(0, 4000, (T,), generator=g, device="cuda")
    slots = torch.randperm(P * S, generator=g, device="cuda")[:T]
    slots[::7] = -1
    cos, sin = naive.rope_tables(D, 1e6, 4096, "cuda")
    w = [(1 + 0.1 * torch.randn(D, generator=g, device="cuda")).bfloat16()
         for _ in range(2)] if head_norm else [None, None]
    pages = [torch.zeros(P, S, Nk, D, **bf) for _ in range(4)]
    want = naive.rope_write(q, k, v, pos, cos, sin, slots, pages[0], pages[1], *w)
    got = ops.rope_write(q, k, v, pos, cos, sin, slots, pages[2], pages[3], *w)
    # one rounding in the kernel vs three in transformers' op-by-op rope: 2 bf16 ulps
    assert (got.float() - want.float()).abs().max() <= 2 * 2 ** -7 * want.abs().max()
    assert (pages[2].float() - pages[0].float()).abs().max() <= 2 * 2 ** -7 * 8
    assert torch.equal(pages[3], pages[1])
    h = torch.randn(T, 2048, generator=g, device="cuda").bfloat16()
    d = torch.randn(T, 2048, generator=g, device="cuda").bfloat16()
    wn = torch.randn(2048, generator=g, device="cuda").bfloat16()
    h1, h2 = h.clone(), h.clone()
    x1, x2 = norm_naive.add_rms_norm(h1, d, wn, 1e-6), norm_ops.add_rms_norm(h2, d, wn, 1e-6)
    assert torch.equal(h1, h2)
    assert (x1.float() - x2.float()).abs().max() <= 2 ** -7 * x1.float().abs().max()


def _decode_512(B: int, seed: int):
    """``B`` decode tokens over 512 keys each at Qwen3-30B-A3B's heads, bf16, pages of 16;
    skipped where this GPU has SMs enough not to split their keys."""
    from moelora_dist.kernels.device import num_sms
    from moelora_dist.kernels.paged_attention import ops

    case = _case([(1, 512)] * B, 32, 4, 128, 16, torch.bfloat16, seed=seed)
    tiles = (B // (ops.DECODE_ROWS // 8) + B) * 4  # decode tiles: 2 tokens x 8 q heads
    splits = ops.decode_splits(tiles, num_sms(case[0].device))
    if splits == 1:
        pytest.skip(f"{tiles} tiles fill this GPU's SMs: no split to merge")
    return case


def _queries(q: torch.Tensor, n: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(10)
    return [torch.randn(q.shape, generator=g, device="cuda").to(q.dtype) for _ in range(n)]


@pytest.mark.parametrize("B", [1, 16], ids=["B1", "B16"])
def test_fused_combine_gpu_equals_two_launches(B, monkeypatch):
    """The last-arriver merge in the attention launch against the combine launch, bit for bit,
    at 1 sequence (4 tiles, 8 splits on an H200) and 16 (96 tiles, 3 splits): 8 "layers" back
    to back on one stream sharing the tile counters, 5 times over (other arrival orders); the
    counters all 0 after; within the bf16 tolerance of the reference."""
    from moelora_dist.kernels.paged_attention import naive, ops

    q, kp, vp, tables, kv, seg = _decode_512(B, seed=3)
    qs = _queries(q, 8)
    kw = dict(scale=128 ** -0.5, decode_only=True)
    monkeypatch.setattr(ops, "COMBINE_FUSED", False)
    two = [ops.paged_attention(x, kp, vp, tables, kv, seg, **kw) for x in qs]
    monkeypatch.setattr(ops, "COMBINE_FUSED", True)
    for _ in range(5):
        fused = [ops.paged_attention(x, kp, vp, tables, kv, seg, **kw) for x in qs]
        torch.cuda.synchronize()
        assert all(torch.equal(f, t) for f, t in zip(fused, two))
    assert not ops._COUNTERS[q.device].any()
    want = naive.paged_attention(qs[0], kp, vp, tables, kv, seg, scale=128 ** -0.5)
    err = (fused[0].float() - want.float()).abs().max().item()
    assert err <= 2e-2 * want.float().abs().max().item(), err


@pytest.mark.parametrize("B", [1, 16], ids=["B1", "B16"])
def test_fused_combine_gpu_in_a_cuda_graph(B, monkeypatch):
    """Captured in a CUDA graph (counters allocated by the eager warm-up, before capture) and
    replayed twice on new queries, 4 layers per graph: each replay bit for bit the eager
    two-launch result of its queries (the counters reset between layers and replays)."""
    from moelora_dist.kernels.paged_attention import ops

    q, kp, vp, tables, kv, seg = _decode_512(B, seed=4)
    kw = dict(scale=128 ** -0.5, decode_only=True)
    static = [torch.zeros_like(q) for _ in range(4)]
    monkeypatch.setattr(ops, "COMBINE_FUSED", True)

    def layers():
        return [ops.paged_attention(x, kp, vp, tables, kv, seg, **kw) for x in static]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, allocates the counters
        for _ in range(2):
            layers()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layers()
    for replay in range(2):
        qs = _queries(q, 8)[4 * replay:4 * replay + 4]
        for x, y in zip(static, qs):
            x.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(ops, "COMBINE_FUSED", False)
        want = [ops.paged_attention(x, kp, vp, tables, kv, seg, **kw) for x in qs]
        monkeypatch.setattr(ops, "COMBINE_FUSED", True)
        assert all(torch.equal(o, w) for o, w in zip(outs, want)), replay
        assert torch.isfinite(outs[0]).all()
    assert not ops._COUNTERS[q.device].any()
