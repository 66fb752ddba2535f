"""The router GEMM and the softmax top-k in one launch (Triton interpreter) against the op
sequence it replaces: ``F.linear`` in the same dtype, then the softmax top-k.

Inputs are multiples of 1/64 in [-1, 1] (exact in bf16 and fp16): every product is a multiple
of 2^-12 and every partial sum stays below 2^8, so the fp32 dot is exact in any order and its
one rounding to bf16 equals ``F.linear``'s bit for bit. Rows are then kept only where the
top k + 1 rounded logits are all distinct (CPU ``torch.topk`` does not keep the lowest ids
among ties): ids must be equal, weights equal to fp32 rounding.

The Triton 3.9 interpreter gets bf16 wrong in two places this kernel uses, so the tests swap
them for torch's (``bf16_as_on_gpu``; the kernel is unchanged): its fp32 -> bf16 cast truncates
the mantissa (the GPU rounds to nearest even), and its dot multiplies bf16 tiles as their raw
uint16 bits.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelora_dist.kernels.router import naive, ops

pytestmark = pytest.mark.usefixtures("poisoned_allocations", "bf16_as_on_gpu")


@pytest.fixture
def bf16_as_on_gpu(monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    real_convert, real_dot = interpreter._convert_float, interpreter.InterpreterBuilder.create_dot

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(
                data.shape)
        return real_convert(data, src, dst, rounding_mode)

    def as_fp32(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return real_dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def exact_inputs(T, H, E, K, seed, dtype=torch.bfloat16):
    """``x [T, H]``, ``w [E, H]`` (module docstring): rows drawn until T of them have their top
    K + 1 logits distinct after rounding to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(-64, 65, (E, H), generator=g) / 64).to(dtype)
    pool = (torch.randint(-64, 65, (8 * T + 32, H), generator=g) / 64).to(dtype)
    top = F.linear(pool, w).float().topk(min(K + 1, E), dim=1).values
    clear = (top[:, 1:] != top[:, :-1]).all(dim=1)
    assert int(clear.sum()) >= T, "too few rows without ties: draw a larger pool"
    return pool[clear][:T].contiguous(), w


def _counters_zero():
    return all(int(c.abs().sum()) == 0 for c in ops._counters.values())


TS = [1, 5, 16, 33, 64]  # one token; under one block; one full block; 3 blocks, last of 1; 4
ES = [8, 60, 128]  # one chunk (half empty); 4 chunks, the last partial; 8 full chunks


@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("T", TS)
def test_fused_gemm_topk_matches_linear_then_topk(T, E, K):
    H = 200  # one full K tile of 128 and a partial one
    x, w = exact_inputs(T, H, E, K, seed=T * 1000 + E * 10 + K)
    for renorm in (True, False):
        logits = torch.empty(T, E, dtype=x.dtype)
        got_w, got_ids = ops.gemm_softmax_topk(x, w, K, renorm, logits)
        want_w, want_ids = naive.gemm_softmax_topk(x, w, K, renorm)
        assert torch.equal(logits, F.linear(x, w))
        assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=1e-7)
        assert _counters_zero()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_and_a_hidden_under_one_tile(dtype):
    x, w = exact_inputs(7, 72, 60, 4, seed=5, dtype=dtype)
    got = ops.gemm_softmax_topk(x, w, 4, True)
    want = naive.gemm_softmax_topk(x, w, 4, True)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)


def test_a_second_call_gives_the_same_result_and_leaves_the_counters_at_zero():
    """Random bf16 (not exact): whatever the sums round to, a second launch repeats it bit for
    bit; a counter left unreset would make its last arriver miss the count."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(33, 136, generator=g).to(torch.bfloat16)
    w = torch.randn(128, 136, generator=g).to(torch.bfloat16)
    first = ops.gemm_softmax_topk(x, w, 8, True)
    assert _counters_zero()
    second = ops.gemm_softmax_topk(x, w, 8, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert _counters_zero()


def test_the_merge_routes_every_chunk_of_the_row():
    """The winners sit in the first chunks, the losers in the last one (the interpreter runs
    the chunks in order, so that one arrives last): only a merge over the whole row finds
    them; a skipped merge leaves the outputs NaN-poisoned."""
    E, H, T = 128, 64, 20
    w = torch.zeros(E, H, dtype=torch.bfloat16)
    w[:, 0] = -4.0
    w[[3, 20, 40, 5], 0] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=w.dtype)  # chunks 0, 1, 2, 0
    x = torch.zeros(T, H, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    weights, ids = ops.gemm_softmax_topk(x, w, 4, True)
    assert ids.tolist() == [[3, 20, 40, 5]] * T
    torch.testing.assert_close(weights, naive.gemm_softmax_topk(x, w, 4, True)[0], rtol=2e-6,
                               atol=1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NaN reductions
def test_only_the_program_that_completes_the_count_routes_from_the_buffer():
    """With token block 0's count started at 1, its 7th chunk completes the count and routes
    before the 8th chunk has stored its logits (the buffer still holds NaN there), and the 8th
    does not route: block 0's rows come out wrong, block 1's right. A kernel that routed in
    every program would get block 0 right (under the interpreter its last program runs last)."""
    x, w = exact_inputs(20, 64, 128, 8, seed=3)
    logits = torch.full((20, 128), float("nan"), dtype=torch.bfloat16)
    counters = ops.token_block_counters(x.device, 2)
    counters[0] = 1
    try:
        _, ids = ops.gemm_softmax_topk(x, w, 8, True, logits)
    finally:
        counters.zero_()
    _, want = naive.gemm_softmax_topk(x, w, 8, True)
    assert torch.equal(ids[16:], want[16:])
    assert not torch.equal(ids[:16], want[:16])


def test_errors_empty_input_and_many_experts():
    x, w = exact_inputs(3, 64, 8, 2, seed=1)
    with pytest.raises(ValueError, match="top_k=9"):
        ops.gemm_softmax_topk(x, w, 9, True)
    with pytest.raises(ValueError, match="16-bit dtype"):
        ops.gemm_softmax_topk(x.float(), w.float(), 2, True)
    with pytest.raises(ValueError, match="logits buffer"):
        ops.gemm_softmax_topk(x, w, 2, True, torch.empty(3, 9, dtype=x.dtype))
    w0, ids0 = ops.gemm_softmax_topk(x[:0], w, 2, True)
    assert w0.shape == (0, 2) and ids0.shape == (0, 2)
    # past 256 experts the last arriver's row would not fit: the unfused path, same results
    x, w = exact_inputs(5, 64, 300, 8, seed=2)
    got, want = ops.gemm_softmax_topk(x, w, 8, True), naive.gemm_softmax_topk(x, w, 8, True)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)


def test_counters_grow_outside_a_capture_only(monkeypatch):
    """A capture must not allocate (the counters would live in the graph's pool), and
    outgrown counters stay alive (a captured graph may still point at them)."""
    monkeypatch.setattr(ops, "_counters", {})
    monkeypatch.setattr(ops, "_retired", [])
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    small = ops.token_block_counters(cpu, 3)
    assert small.numel() >= 3 and ops.token_block_counters(cpu, 3) is small
    big = ops.token_block_counters(cpu, small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0
    assert ops._retired == [small]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setitem(ops._counters, cuda, torch.zeros(4, dtype=torch.int32))
    assert ops.token_block_counters(cuda, 4) is ops._counters[cuda]
    assert ops.token_block_counters(cuda, 5) is None  # too small while capturing: no launch


def test_without_counters_the_gemm_and_the_topk_run_apart(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the fused kernel was launched")

    monkeypatch.setattr(ops, "token_block_counters", lambda device, n: None)
    monkeypatch.setattr(ops, "_gemm_softmax_topk_kernel", NoLaunch())
    x, w = exact_inputs(5, 64, 60, 4, seed=4)
    logits = torch.empty(5, 60, dtype=x.dtype)
    got = ops.gemm_softmax_topk(x, w, 4, False, logits)
    want = naive.gemm_softmax_topk(x, w, 4, False)
    assert torch.equal(logits, F.linear(x, w)) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
