"""Attention sinks (gpt-oss) in the paged-attention family: the reference against an explicit
per-row softmax over ``[scores | sink]`` (transformers' eager attention), and the Triton kernel
(interpreter) against the reference on every case of the paged-attention tests (ragged decode,
prefill chunks, padding rows, GQA groups, odd pages, sliding window), pages shuffled and every
slot no sequence owns NaN.

Tolerances as in ``test_kernels_paged_attention.py``: fp32 1e-5 (online vs one softmax), fp16
2e-3 (the kernel's fp16 probabilities in P.V).
"""

import pytest
import torch

from moelora_dist.kernels.paged_attention import naive, ops
from tests.unit.test_kernels_paged_attention import CASES, TOL, _case

pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _sinks(Nq: int, seed: int = 7) -> torch.Tensor:
    # O(1) logits like the scores', so the sink takes a real share of every row
    return torch.randn(Nq, generator=torch.Generator().manual_seed(seed)) * 2


def _explicit(q, kp, vp, tables, kv, seg, scale, window, sinks):
    """One query row at a time: softmax over its visible keys and the sink, sink dropped."""
    T, Nq, D = q.shape
    S, Nk = kp.shape[1], kp.shape[2]
    out = torch.zeros(T, Nq, D)
    for b, L in enumerate(kv.tolist()):
        q0, q1 = int(seg[b]), int(seg[b + 1])
        for t in range(q0, q1):
            pos = L - (q1 - t)
            for h in range(Nq):
                seen = [j for j in range(L) if j <= pos and (window is None or j > pos - window)]
                keys = torch.stack([kp[tables[b, j // S], j % S, h // (Nq // Nk)] for j in seen])
                vals = torch.stack([vp[tables[b, j // S], j % S, h // (Nq // Nk)] for j in seen])
                logits = torch.cat([keys.float() @ q[t, h].float() * scale, sinks[h:h + 1]])
                out[t, h] = torch.softmax(logits, 0)[:-1] @ vals.float()
    return out


@pytest.mark.parametrize("name", ["prefill_chunks", "gqa_4_odd_page", "sliding_window"])
def test_reference_sinks_equal_an_explicit_softmax(name):
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32)
    sinks = _sinks(Nq)
    got = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                sliding_window=window, sinks_N=sinks)
    want = _explicit(q, kp, vp, tables, kv, seg, D ** -0.5, window, sinks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                  sliding_window=window)
    assert (got - plain).abs().max() > 0.05  # the sink matters at these sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_sinks_match_reference(name, dtype):
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, dtype)
    sinks = _sinks(Nq).to(dtype)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                 sliding_window=window, sinks_N=sinks)
    decode = all(n == 1 for n, _ in seqs)
    for decode_only in sorted({decode, False}):
        got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                  sliding_window=window, decode_only=decode_only, sinks_N=sinks)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)
    for b, (n, L) in enumerate(seqs):
        if L == 0:  # padding sequences stay zero rows with sinks too
            assert (got[int(seg[b]):int(seg[b + 1])] == 0).all()


def test_a_sink_takes_weight_from_every_row():
    """With every value 1 the output is a row's total key weight: 1 without sinks, below 1
    (and above 0) with them, in the kernel as in the reference."""
    seqs, Nq, Nk, D, S, window = CASES["sliding_window"]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32)
    ones = torch.where(torch.isnan(vp), vp, torch.ones_like(vp))
    sinks = _sinks(Nq)
    for kern in (naive, ops):
        with_sink = kern.paged_attention(q, kp, ones, tables, kv, seg, scale=0.4,
                                         sliding_window=window, sinks_N=sinks)
        without = kern.paged_attention(q, kp, ones, tables, kv, seg, scale=0.4,
                                       sliding_window=window)
        assert (with_sink < 1).all() and (with_sink > 0).all()
        torch.testing.assert_close(without, torch.ones_like(without), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["decode_ragged", "sliding_window", "padding_rows"])
def test_split_keys_with_sinks_match_reference(name):
    """The combine of split keys starts from the sink (max = sink, sum = 1), as the unsplit
    kernel does."""
    seqs, Nq, Nk, D, S, window = CASES[name]
    q, kp, vp, tables, kv, seg = _case(seqs, Nq, Nk, D, S, torch.float32)
    sinks = _sinks(Nq)
    want = naive.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                                 sliding_window=window, sinks_N=sinks)
    got = ops.paged_attention(q, kp, vp, tables, kv, seg, scale=D ** -0.5,
                              sliding_window=window, decode_only=True, sinks_N=sinks,
                              num_splits=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
