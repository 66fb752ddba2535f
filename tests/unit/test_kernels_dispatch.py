"""The dispatch kernels (``kernels/dispatch``) under the Triton interpreter against their
references, and the references against the row format's contract.

Every Triton output is compared with the reference bit for bit (packing copies bytes; the
combine adds the same fp32 values in the same destination order). Fresh allocations are
poisoned, and the exchange buffer is pre-filled with two different byte patterns, so a kernel
that leaves any byte it owns unwritten fails.
"""

import pytest
import torch

from moelora_dist.kernels.dispatch import naive, ops
from moelora_dist.kernels.dispatch.wire import (HEADER_COUNT_MASK, HEADER_OVERFLOW_BIT,
                                                RowFormat, dest_block, send_blocks)
from moelora_dist.moe.dispatch.packing import row_layout
from moelora_dist.testing.dispatch_cases import CASES, make_case

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


def _fmt(c) -> RowFormat:
    return RowFormat(c.x_nH.shape[1], c.topk_ids_nK.shape[1], c.x_nH.dtype)


def _needs(c, d) -> list[int]:
    """Tokens of the share that need destination d, in order (the contract, by hand)."""
    lo, hi = d * c.num_local, (d + 1) * c.num_local
    return [i for i, row in enumerate(c.topk_ids_nK.tolist()) if any(lo <= e < hi for e in row)]


@pytest.mark.parametrize("top_k", range(1, 17))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_row_format_is_the_packing_layout_with_a_header_word(top_k, dtype):
    fmt = RowFormat(37, top_k, dtype)
    assert (fmt.x_offset, fmt.row_bytes) == row_layout(37, top_k, dtype)
    assert fmt.x_offset % 16 == 0 and fmt.row_bytes % 16 == 0
    assert 2 * top_k + 1 == fmt.header_word < fmt.meta_words  # the pad word always exists
    assert fmt.x_columns * fmt.itemsize == fmt.row_bytes - fmt.x_offset


@pytest.mark.parametrize("name", CASES)
def test_index_matches_reference_and_contract(name, poisoned_allocations):
    c = make_case(name)
    args = (c.topk_ids_nK, c.num_local, c.num_dest, c.capacity, c.overflow_capacity)
    ref, got = naive.dispatch_index(*args), ops.dispatch_index(*args)
    for field, a, b in zip(ref._fields, ref, got):
        assert a.shape == b.shape and torch.equal(a, b), field
    for d in range(c.num_dest):
        need = _needs(c, d)
        assert int(ref.counts_P[d]) == len(need)
        main, extra = need[:c.capacity], need[c.capacity:]
        assert ref.inv_PC[d].tolist() == main + [-1] * (c.capacity - len(main))
        assert ref.overflow_inv_PO[d, :len(extra)].tolist() == extra
        assert [i for i in range(len(c.topk_ids_nK)) if ref.pos_nP[i, d] >= 0] == need
        assert [int(ref.pos_nP[i, d]) for i in need] == list(range(len(need)))


def _packed(c, kern, me, bypass, fill):
    fmt = _fmt(c)
    index = naive.dispatch_index(c.topk_ids_nK, c.num_local, c.num_dest, c.capacity,
                                 c.overflow_capacity)
    P = c.num_dest
    buf = torch.full(((P + send_blocks(P, bypass)) * c.capacity, fmt.row_bytes), fill,
                     dtype=torch.uint8)
    kern.pack_main(buf, fmt, c.x_nH, c.topk_weights_nK, c.topk_ids_nK, c.token_slot_n, index,
                   num_local_experts=c.num_local, capacity=c.capacity, me=me, bypass=bypass)
    return buf, index


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bypass", [True, False], ids=["bypass", "no-bypass"])
@pytest.mark.parametrize("name", CASES)
def test_pack_main_matches_reference(name, bypass, dtype):
    c = make_case(name, dtype=dtype)
    for me in sorted({0, c.num_dest - 1, c.num_dest // 2}):
        for fill in (0x00, 0xA5):  # a byte the kernel skipped would match only one fill
            ref, _ = _packed(c, naive, me, bypass, fill)
            got, _ = _packed(c, ops, me, bypass, fill)
            assert torch.equal(ref, got), f"me={me} fill={fill:#x}: rows " \
                f"{(ref != got).any(dim=1).nonzero().flatten().tolist()} differ"


@pytest.mark.parametrize("name", CASES)
def test_packed_rows_carry_token_weights_local_ids_slot_and_header(name):
    c = make_case(name, dtype=torch.float64)
    fmt, P, C, K = _fmt(c), c.num_dest, c.capacity, c.topk_ids_nK.shape[1]
    me = P - 1
    buf, index = _packed(c, naive, me, True, 0xA5)
    w_all, ids_all, slot_all = naive.unpack_meta(buf, fmt)
    x_all, headers = fmt.x_view(buf), fmt.headers(buf)
    counts = [len(_needs(c, d)) for d in range(P)]
    flag = HEADER_OVERFLOW_BIT if max(counts) > C else 0
    for d in range(P):
        need = _needs(c, d)
        rows = range(dest_block(d, me, P, True) * C, (dest_block(d, me, P, True) + 1) * C)
        for j, r in enumerate(rows):
            assert int(headers[r]) == counts[d] | flag
            assert int(headers[r]) & HEADER_COUNT_MASK == counts[d]
            if j >= len(need):  # padding: routes nowhere, carries nothing
                assert (ids_all[r] == -1).all() and slot_all[r] == -1
                assert (w_all[r] == 0).all() and (x_all[r] == 0).all()
                continue
            t = need[j]
            assert torch.equal(x_all[r], c.x_nH[t]) and torch.equal(w_all[r], c.topk_weights_nK[t])
            gid = c.topk_ids_nK[t].long()
            own = (gid >= d * c.num_local) & (gid < (d + 1) * c.num_local)
            assert ids_all[r].tolist() == torch.where(own, gid - d * c.num_local, -1).tolist()
            assert int(slot_all[r]) == (-1 if c.token_slot_n is None else int(c.token_slot_n[t]))
    tail = buf[:, fmt.x_offset + fmt.hidden * fmt.itemsize:]
    written = torch.cat([torch.arange(dest_block(d, me, P, True) * C,
                                      (dest_block(d, me, P, True) + 1) * C) for d in range(P)])
    assert (tail[written] == 0).all()
    assert (fmt.words(buf)[written, 2 * K + 2:fmt.meta_words] == 0).all()


@pytest.mark.parametrize("name", ["mixed", "skewed", "wide", "bad_ids"])
def test_pack_overflow_matches_reference(name):
    c = make_case(name, dtype=torch.float16)
    fmt = _fmt(c)
    index = naive.dispatch_index(c.topk_ids_nK, c.num_local, c.num_dest, c.capacity,
                                 c.overflow_capacity)
    rows_P = [max(0, int(n) - c.capacity) for n in index.counts_P]
    assert sum(rows_P) > 0, "the case must overflow"
    off_P = [sum(rows_P[:d]) for d in range(c.num_dest)]
    bufs = []
    for kern in (naive, ops):
        buf = torch.full((sum(rows_P), fmt.row_bytes), 0xA5, dtype=torch.uint8)
        kern.pack_overflow(buf, fmt, c.x_nH, c.topk_weights_nK, c.topk_ids_nK, c.token_slot_n,
                           index, num_local_experts=c.num_local, capacity=c.capacity,
                           rows_P=rows_P, row_off_P=off_P)
        bufs.append(buf)
    assert torch.equal(*bufs)
    x = fmt.x_view(bufs[0])
    for d in range(c.num_dest):
        extra = _needs(c, d)[c.capacity:]
        assert len(extra) == rows_P[d]
        for j, t in enumerate(extra):
            assert torch.equal(x[off_P[d] + j], c.x_nH[t])


@pytest.mark.parametrize("name", CASES)
def test_unpack_meta_matches_reference(name, poisoned_allocations):
    c = make_case(name)
    buf, _ = _packed(c, naive, 0, False, 0x00)
    ref, got = naive.unpack_meta(buf, _fmt(c)), ops.unpack_meta(buf, _fmt(c))
    for a, b in zip(ref, got):
        assert b.is_contiguous() and a.dtype == b.dtype and torch.equal(a, b)


def _combine_inputs(c, bypass, me, dtype, g):
    index = naive.dispatch_index(c.topk_ids_nK, c.num_local, c.num_dest, c.capacity,
                                 c.overflow_capacity)
    P, C, H = c.num_dest, c.capacity, c.x_nH.shape[1]
    rn = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    rows_P = [max(0, int(n) - C) for n in index.counts_P]
    y = rn(P * C + 3, H)
    back = rn(send_blocks(P, bypass) * C, H) if P > 1 else None
    ovf = rn(sum(rows_P), H) if sum(rows_P) else None
    off = [sum(rows_P[:d]) for d in range(P)] if ovf is not None else None
    return index, y, back, ovf, off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("bypass", [True, False], ids=["bypass", "no-bypass"])
@pytest.mark.parametrize("name", CASES)
def test_combine_matches_reference(name, bypass, dtype, poisoned_allocations):
    c = make_case(name)
    g = torch.Generator().manual_seed(7)
    C0 = c.x_nH.shape[0] + 2  # two padding rows of the share: must come out zero
    for me in sorted({0, c.num_dest - 1}):
        index, y, back, ovf, off = _combine_inputs(c, bypass, me, dtype, g)
        outs = []
        for kern in (naive, ops):
            out = torch.empty(C0, y.shape[1], dtype=dtype)
            outs.append(kern.combine(out, index.pos_nP, y, back, ovf, off, capacity=c.capacity,
                                     me=me, bypass=bypass))
        if dtype == torch.bfloat16:
            # The interpreter rounds fp32 -> bf16 toward zero (seen with Triton 3.9), PyTorch
            # to nearest: one bf16 ulp apart at most. The GPU test compares bit for bit.
            torch.testing.assert_close(outs[1], outs[0], rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(outs[0], outs[1]), f"me={me}"
        assert (outs[1][c.x_nH.shape[0]:] == 0).all()


@pytest.mark.parametrize("name", ["mixed", "skewed", "wide", "empty_share"])
def test_combine_sums_each_tokens_copies(name):
    c = make_case(name)
    g = torch.Generator().manual_seed(3)
    P, C, me = c.num_dest, c.capacity, c.num_dest - 1
    index, y, back, ovf, off = _combine_inputs(c, True, me, torch.float64, g)
    out = naive.combine(torch.empty(c.x_nH.shape[0], y.shape[1], dtype=torch.float64),
                        index.pos_nP, y, back, ovf, off, capacity=C, me=me, bypass=True)
    want = torch.zeros_like(out)
    for d in range(P):
        for j, t in enumerate(_needs(c, d)):
            if j >= C:
                want[t] += ovf[off[d] + j - C]
            elif d == me:
                want[t] += y[j]
            else:
                want[t] += back[(d - (d > me)) * C + j]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_long_share_walks_several_blocks(poisoned_allocations):
    # 5000 tokens: the index kernel's prefix count crosses blocks of 2048 (the carry), and the
    # capacity (2100) and the overflow room both span more than one fill block.
    from moelora_dist.testing.dispatch_cases import DispatchCase

    g = torch.Generator().manual_seed(5)
    n, K, P, El = 5000, 2, 2, 4
    c = DispatchCase(torch.randn(n, 8, generator=g), torch.rand(n, K, generator=g),
                     torch.randint(-1, P * El, (n, K), generator=g, dtype=torch.int32),
                     torch.randint(-1, 4, (n,), generator=g, dtype=torch.int32), El, P, 2100)
    args = (c.topk_ids_nK, c.num_local, c.num_dest, c.capacity, c.overflow_capacity)
    ref, got = naive.dispatch_index(*args), ops.dispatch_index(*args)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert int(ref.counts_P.min()) > c.capacity  # both destinations overflow
    assert torch.equal(_packed(c, naive, 1, True, 0x5A)[0], _packed(c, ops, 1, True, 0x5A)[0])


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts code the compiler rejects (types, layouts): compile every
    # kernel for an H100/H200 in a process without TRITON_INTERPRET.
    import os
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "moelora_dist.testing.compile_dispatch"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   ") == 6
