"""The paged-attention family and the fused residual-add + RMSNorm (Triton interpreter)
against their references.

fp32 and fp16 (bf16 dots are wrong under the interpreter; bf16 runs in tests/gpu). Each
attention case lays the sequences' pages out in a random order over a pool larger than they
need and fills every page no sequence owns -- and the stale tail of each last page -- with NaN:
a kernel that read outside a sequence's keys would return NaN. Tolerances: fp32 differs by
summation order (online vs one softmax), 1e-5; fp16 by the kernel's fp16 probabilities in the
P.V product, 2e-3 on outputs of size O(1). A split decode is merged either by the last of a
tile's programs in the attention launch (``COMBINE_FUSED``) or by the combine launch: the same
bits, checked against each other.
"""

import pytest
import torch

from moelora_dist.kernels.norm import naive as norm_naive
from moelora_dist.kernels.norm import ops as norm_ops
from moelora_dist.kernels.paged_attention import naive, ops

pytestmark = pytest.mark.usefixtures("poisoned_allocations")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# name -> (seqs as (new tokens, keys after the step), q heads, kv heads, head dim, page size,
#          sliding window)
CASES = {
    "decode_ragged": ([(1, 1), (1, 7), (1, 33), (1, 16)], 4, 2, 16, 4, None),
    "prefill_chunks": ([(5, 5), (3, 11), (17, 40), (1, 9)], 4, 2, 16, 8, None),
    "padding_rows": ([(2, 2), (1, 0), (0, 0), (3, 9)], 4, 2, 16, 4, None),
    "gqa_4_odd_page": ([(4, 13), (1, 6)], 8, 2, 16, 3, None),
    "mha_dim_24": ([(3, 10), (2, 2)], 2, 2, 24, 4, None),
    "group_3": ([(2, 12), (1, 5)], 6, 2, 16, 4, None),
    "kv_replicated_one_head": ([(6, 6), (1, 20)], 4, 1, 16, 16, None),
    "sliding_window": ([(6, 14), (1, 30), (9, 9)], 4, 2, 16, 4, 5),
    # narrower than tl.dot's K of 16 (the tiny family models' heads): zero-padded columns
    "head_dim_8": ([(3, 9), (1, 5)], 4, 2, 8, 4, None),
}


def test_head_tile_pads_narrow_heads_to_the_dot_minimum():
    """The GPU rejects a ``tl.dot`` of inner size below 16 (found on the H200 with the tiny
    GLM-4.5 and gpt-oss models, head dim 8); the interpreter does not, so pin the tile here."""
    from moelora_dist.kernels.paged_attention.ops import head_block

    assert [head_block(d) for d in (8, 10, 16, 24, 64, 128)] == [16, 16, 16, 32, 64, 128]


def _case(seqs, Nq, Nk, D, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // S) for _, L in seqs]
    P = sum(need) + 3
    kp = torch.full((P, S, Nk, D), float("nan"), dtype=dtype)
    vp = kp.clone()
    order = torch.randperm(P, generator=g).tolist()
    M = max(max(need), 1)
    tables = torch.zeros(len(seqs), M, dtype=torch.int32)
    used = 0
    for b, (_, L) in enumerate(seqs):
        pages = order[used:used + need[b]]
        used += need[b]
        tables[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for j in range(L):  # only a sequence's own keys are finite
            kp[pages[j // S], j % S] = torch.randn(Nk, D, generator=g).to(dtype)
            vp[pages[j // S], j % S] = torch.randn(Nk, D, generator=g).to(dtype)
    seg = [0]
    for q, _ in seqs:
        seg.append(seg[-1] + q)
    q = torch.randn(seg[-1], Nq, D, generator=g).to(dtype)
    return q, kp, vp, tables, torch.tensor([L for _, L in seqs], dtype=torch.int32), \
        torch.tensor(seg, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_reference(name, dtype):
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, dtype)
    decode = all(n == 1 for n, _ in seqs)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                 sliding_window=window)
    for decode_only in sorted({decode, False}):
        got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                  sliding_window=window, decode_only=decode_only)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)
    for b, (n, L) in enumerate(seqs):
        if L == 0:  # padding sequences: zero rows, written (the allocation was NaN)
            assert (got[int(seg[b]):int(seg[b + 1])] == 0).all()


def test_paged_attention_int64_tables_and_attention_sink_free():
    """int64 metadata (what the engine's plans carry) gives the same result as int32."""
    seqs, Nq, Nk, D, S, _ = CASES["prefill_chunks"]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32)
    a = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=0.25)
    b = ops.paged_attention(q, kp, vp, tables.long(), kv.long(), seg.long(), scale=0.25)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_norm", [False, True], ids=["no_norm", "head_norm"])
def test_rope_write_matches_reference(dtype, head_norm):
    g = torch.Generator().manual_seed(1)
    T, Nq, Nk, D, P, S = 6, 4, 2, 16, 5, 4
    qkv = torch.randn(T, (Nq + 2 * Nk) * D, generator=g).to(dtype)  # one fused projection
    q = qkv[:, :Nq * D].view(T, Nq, D)
    k = qkv[:, Nq * D:(Nq + Nk) * D].view(T, Nk, D)
    v = qkv[:, (Nq + Nk) * D:].view(T, Nk, D)
    pos = torch.tensor([0, 3, 7, 2, 9, 30])
    slots = torch.tensor([0, 5, -1, 13, 19, 7])  # -1: a padding token stores nothing
    cos, sin = naive.rope_tables(D, 1e4, 32)
    w = [(1 + 0.1 * torch.randn(D, generator=g)).to(dtype) for _ in range(2)] if head_norm \
        else [None, None]
    pages = [torch.full((P, S, Nk, D), 7.0, dtype=dtype) for _ in range(4)]
    want = naive.rope_write(q, k, v, pos, cos, sin, slots, pages[0], pages[1], *w)
    got = ops.rope_write(q, k, v, pos, cos, sin, slots, pages[2], pages[3], *w)
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 2)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
    torch.testing.assert_close(pages[2].float(), pages[0].float(), atol=tol, rtol=0)
    assert torch.equal(pages[3], pages[1])  # v is copied
    untouched = torch.ones(P * S, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (pages[2].view(P * S, Nk, D)[untouched] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("H", [48, 64], ids=["H48", "H64"])
def test_add_rms_norm_matches_reference(dtype, H):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, H, generator=g).to(dtype)
    d = torch.randn(5, H, generator=g).to(dtype)
    w = torch.randn(H, generator=g).to(dtype)
    h1, h2 = h.clone(), h.clone()
    x1 = norm_naive.add_rms_norm(h1, d, w, 1e-6)
    x2 = norm_ops.add_rms_norm(h2, d, w, 1e-6)
    assert torch.equal(h1, h2)  # the residual sum is rounded once, as transformers does
    torch.testing.assert_close(x2, x1, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(norm_ops.add_rms_norm(h2, None, w, 1e-6),
                               norm_naive.add_rms_norm(h1, None, w, 1e-6), atol=TOL[dtype],
                               rtol=0)


@pytest.mark.parametrize("num_splits", [2, 3, 16], ids=["s2", "s3", "s16"])
@pytest.mark.parametrize("name", ["decode_ragged", "prefill_chunks", "padding_rows",
                                  "gqa_4_odd_page", "sliding_window", "head_dim_8"])
def test_split_keys_match_reference(name, num_splits):
    """Each tile's keys split over programs (fp32 partials merged by the combine launch) give
    the unsplit result, prefill chunks, windows and empty splits (16 splits of a few dozen
    keys) included."""
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32, seed=2)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                 sliding_window=window)
    got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                              sliding_window=window, decode_only=True, num_splits=num_splits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mha_dim_24", "decode_ragged", "sliding_window"])
def test_split_combine_in_head_dim_chunks_equals_one_chunk(name, monkeypatch):
    """The combine's programs each merge a chunk of the head dim (``COMBINE_CHUNK_D``): 16 of
    the 32-column tile of a 24-wide head (the second chunk half padding) and of 16-wide heads
    (one chunk), bit for bit the one-chunk merge, and the reference's result; unrolled loads
    of 8 partials over 3 and 16 splits too. The fused merge loops over the same chunks in one
    program: the same bits."""
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32, seed=4)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                 sliding_window=window)
    for splits in (3, 16):
        got = {}
        for fused, chunk in ((False, 16), (False, 0), (True, 16)):
            monkeypatch.setattr(ops, "COMBINE_FUSED", fused)
            monkeypatch.setattr(ops, "COMBINE_CHUNK_D", chunk)
            got[fused, chunk] = ops.paged_attention(q, kp, vp, tables, kv, seg,
                                                    scale=D ** -0.5, sliding_window=window,
                                                    decode_only=True, num_splits=splits)
        assert torch.equal(got[False, 16], got[False, 0])
        assert torch.equal(got[True, 16], got[False, 0])
        torch.testing.assert_close(got[False, 16], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_launches"])
def test_long_context_decode_splits(fused, monkeypatch):
    """A decode over 300 keys: 5 key tiles, split 1, 2 and 4 ways (the default on the CPU
    splits too), the same output each way, with either merge."""
    monkeypatch.setattr(ops, "COMBINE_FUSED", fused)
    seqs = [(1, 300), (1, 77)]
    q, kp, vp, tables, kv, seg = _case(seqs, 8, 2, 16, 16, torch.float32, seed=5)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=0.25)
    for n in (None, 1, 2, 4):
        got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=0.25, decode_only=True,
                                  num_splits=n)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_decode_splits_fill_the_gpu_only_when_tiles_do_not():
    assert ops.decode_splits(4, 132) == 8  # one sequence, 4 kv heads
    assert ops.decode_splits(9 * 4, 132) == 8  # 16 sequences: 9 tile rows
    assert ops.decode_splits(40, 132) == 7
    assert ops.decode_splits(96 * 4, 132) == 1  # 64 sequences
    assert ops.decode_splits(384 * 4, 132) == 1  # 256 sequences


class _NoLaunch:
    """Stands for ``_paged_combine_kernel`` where the fused path must not launch it."""

    def __getitem__(self, grid):
        raise AssertionError("the fused path launched the combine kernel")


# decode, GQA 4, pages of 4 shuffled: 200 keys fill 2 of 3 splits (128 keys each) or 4 of 8
# (64 each); 1, 5 and 40 keys leave all splits but the first empty; the padding sequence
# leaves spare tiles, whose programs return before the counter
FUSED_SEQS = [(1, 1), (1, 200), (1, 5), (0, 0), (1, 40), (1, 130)]


@pytest.mark.parametrize("splits,sinks", [(3, False), (8, True)], ids=["s3", "s8_sinks"])
def test_fused_combine_equals_two_launches(splits, sinks, monkeypatch):
    """The last split program of each tile merges in the attention launch (``COMBINE_FUSED``):
    bit for bit the combine launch's result, the reference's within fp32 tolerance (an
    unmerged or half-merged tile is NaN or wrong), the tile counters all 0 after the call, so
    a second call gives the same bits."""
    q, kp, vp, tables, kv, seg = _case(FUSED_SEQS, 8, 2, 16, 4, torch.float32, seed=6)
    sinks_N = torch.randn(8, generator=torch.Generator().manual_seed(7)) * 2 if sinks else None
    kw = dict(scale=0.25, decode_only=True, num_splits=splits, sinks_N=sinks_N)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=0.25, sinks_N=sinks_N)
    monkeypatch.setattr(ops, "COMBINE_FUSED", False)
    two = ops.paged_attention(q, kp, vp, tables, kv, seg, **kw)
    monkeypatch.setattr(ops, "COMBINE_FUSED", True)
    monkeypatch.setattr(ops, "_paged_combine_kernel", _NoLaunch())
    fused = [ops.paged_attention(q, kp, vp, tables, kv, seg, **kw) for _ in range(2)]
    assert not ops._COUNTERS[q.device].any()
    assert torch.equal(fused[0], two) and torch.equal(fused[1], two)
    torch.testing.assert_close(fused[0], want, atol=1e-5, rtol=0)


def test_tile_counters_grow_outside_capture_and_fall_back_inside(monkeypatch):
    """The counter buffer holds at least one per SM, grows (doubling) for more tiles and keeps
    the outgrown buffer alive (a graph captured on it still uses it); a call captured while it
    is too small merges with the combine launch, the same bits, allocating nothing."""
    monkeypatch.setattr(ops, "_COUNTERS", {})
    monkeypatch.setattr(ops, "_OUTGROWN", [])
    cpu = torch.device("cpu")
    small = ops._tile_counters(cpu, 3)
    assert small.dtype == torch.int32 and small.numel() == ops.num_sms(cpu)
    assert not small.any() and ops._tile_counters(cpu, small.numel()) is small
    big = ops._tile_counters(cpu, small.numel() + 1)
    assert big.numel() == 2 * small.numel() and ops._OUTGROWN == [small]

    q, kp, vp, tables, kv, seg = _case(FUSED_SEQS, 8, 2, 16, 4, torch.float32, seed=6)
    kw = dict(scale=0.25, decode_only=True, num_splits=3)
    eager = ops.paged_attention(q, kp, vp, tables, kv, seg, **kw)
    monkeypatch.setattr(ops, "_COUNTERS", {})
    monkeypatch.setattr(ops, "capturing", lambda device: True)
    captured = ops.paged_attention(q, kp, vp, tables, kv, seg, **kw)
    assert ops._COUNTERS == {} and torch.equal(captured, eager)
