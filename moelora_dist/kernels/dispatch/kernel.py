"""Triton kernels of the dispatch family (imports triton only; host glue is in ``ops.py``).

Row format and placement: :mod:`moelora_dist.kernels.dispatch.wire` (the numbers arrive as
arguments). Every masked-off lane loads its ``other`` value and stores nothing; a ``-1`` token,
expert id or slot is never used to form an address that is read.
"""

import triton
import triton.language as tl


@triton.jit
def _dispatch_index_kernel(ids_ptr, stride_ids_n, stride_ids_k, num_tokens, top_k,
                           num_local, capacity, overflow_rows, overflow_stride, num_dest,
                           pos_ptr, inv_ptr, ovf_ptr, counts_ptr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per destination ``d``: a running prefix count over the share's tokens gives
    each token needing ``d`` its row (token order), written to ``pos[i, d]`` and inverted into
    ``inv[d, row]`` (rows below the capacity) or ``ovf[d, row - capacity]``; then the unused
    rows of ``inv[d]`` and ``ovf[d]`` get ``-1`` and ``counts[d]`` the total."""
    d = tl.program_id(0).to(tl.int64)
    lo = d * num_local
    kk = tl.arange(0, BLOCK_K)
    carry = tl.zeros([], dtype=tl.int32)
    for t0 in range(0, num_tokens, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < num_tokens
        ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * stride_ids_n + kk[None, :] * stride_ids_k,
                      mask=tm[:, None] & (kk[None, :] < top_k), other=-1)
        hit = (ids >= lo) & (ids < lo + num_local)
        need = tl.max(hit.to(tl.int32), axis=1)
        pos = carry + tl.cumsum(need, axis=0) - 1
        tl.store(pos_ptr + t.to(tl.int64) * num_dest + d, tl.where(need > 0, pos, -1), mask=tm)
        live = tm & (need > 0)
        tl.store(inv_ptr + d * capacity + pos, t, mask=live & (pos < capacity))
        tl.store(ovf_ptr + d * overflow_stride + (pos - capacity), t,
                 mask=live & (pos >= capacity))
        carry += tl.sum(need, axis=0)
    tl.store(counts_ptr + d, carry)
    for r0 in range(0, capacity, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        tl.store(inv_ptr + d * capacity + r, tl.full([BLOCK_N], -1, tl.int32),
                 mask=(r < capacity) & (r >= carry))
    for r0 in range(0, overflow_rows, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        tl.store(ovf_ptr + d * overflow_stride + r, tl.full([BLOCK_N], -1, tl.int32),
                 mask=(r < overflow_rows) & (r >= carry - capacity))


@triton.jit
def _dispatch_pack_kernel(x_ptr, stride_x_n, stride_x_h, w_ptr, stride_w_n, ids_ptr,
                          stride_ids_n, slot_ptr, inv_ptr, stride_inv, counts_ptr,
                          rows_ptr, off_ptr, words_ptr, xo_ptr,
                          rows_per_dest, capacity, num_local, me, num_dest, top_k, hidden,
                          x_columns, meta_words, row_words, row_elems, x_start,
                          HAS_SLOT: tl.constexpr, LIST: tl.constexpr, BYPASS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    """``BLOCK_M`` rows of the logical ``[P, rows_per_dest]`` send space per program: each
    row gathers its token (``inv``; ``-1`` = padding) and writes the whole byte row -- meta
    words (weights, ids local to the destination, slot, header, zeros) and x then zeros.

    ``LIST=False`` (main exchange): destination ``d`` has ``capacity`` rows at block
    ``0`` (itself, with ``BYPASS``; the host sets it when ``P == 1``) or ``P + d - (d > me)``
    (``P + d`` without), times ``capacity``. ``LIST=True`` (overflow): ``rows[d]`` rows starting at row ``off[d]``."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_grid = r < num_dest * rows_per_dest
    d = r // rows_per_dest
    j = r % rows_per_dest
    if LIST:
        nrows = tl.load(rows_ptr + d, mask=in_grid, other=0)
        base = tl.load(off_ptr + d, mask=in_grid, other=0).to(tl.int64)
    else:
        nrows = capacity
        if BYPASS:
            blk = tl.where(d == me, 0, num_dest + d - (d > me).to(tl.int64))
        else:
            blk = num_dest + d
        base = blk * capacity
    live = in_grid & (j < nrows)
    tok = tl.load(inv_ptr + d * stride_inv + j, mask=live, other=-1).to(tl.int64)
    valid = live & (tok >= 0)
    out_row = base + j
    # Header: this destination's count, and the flag when any destination overflowed.
    pp = tl.arange(0, BLOCK_P)
    counts = tl.load(counts_ptr + pp, mask=pp < num_dest, other=0)
    overflow = tl.max((counts > capacity).to(tl.int32), axis=0)
    header = tl.load(counts_ptr + d, mask=in_grid, other=0) | (overflow << 30)
    c = tl.arange(0, BLOCK_W)
    vm = valid[:, None]
    wbits = tl.load(w_ptr + tok[:, None] * stride_w_n + c[None, :],
                    mask=vm & (c[None, :] < top_k), other=0.0).to(tl.int32, bitcast=True)
    gid = tl.load(ids_ptr + tok[:, None] * stride_ids_n + (c[None, :] - top_k),
                  mask=vm & (c[None, :] >= top_k) & (c[None, :] < 2 * top_k), other=-1)
    lo = (d * num_local)[:, None]
    local = tl.where((gid >= lo) & (gid < lo + num_local), gid - lo, -1).to(tl.int32)
    if HAS_SLOT:
        slot = tl.load(slot_ptr + tok, mask=valid, other=-1)
    else:
        slot = tl.full([BLOCK_M], -1, tl.int32)
    slot = tl.where(valid, slot, -1)
    cc = c[None, :]
    word = tl.where(cc < top_k, wbits,
                    tl.where(cc < 2 * top_k, local,
                             tl.where(cc == 2 * top_k, slot[:, None],
                                      tl.where(cc == 2 * top_k + 1, header[:, None], 0))))
    tl.store(words_ptr + out_row[:, None] * row_words + cc, word,
             mask=live[:, None] & (cc < meta_words))
    for h0 in range(0, x_columns, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        v = tl.load(x_ptr + tok[:, None] * stride_x_n + h[None, :] * stride_x_h,
                    mask=vm & (h[None, :] < hidden), other=0)
        tl.store(xo_ptr + out_row[:, None] * row_elems + x_start + h[None, :],
                 v.to(xo_ptr.dtype.element_ty), mask=live[:, None] & (h[None, :] < x_columns))


@triton.jit
def _unpack_meta_kernel(words_ptr, row_words, num_rows, top_k, w_ptr, ids_ptr, slot_ptr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Received rows' weights, ids and slot into three contiguous arrays (x stays in place)."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < num_rows
    k = tl.arange(0, BLOCK_K)
    m = rm[:, None] & (k[None, :] < top_k)
    row = words_ptr + r[:, None] * row_words
    wbits = tl.load(row + k[None, :], mask=m, other=0)
    tl.store(w_ptr + r[:, None] * top_k + k[None, :], wbits.to(tl.float32, bitcast=True), mask=m)
    ids = tl.load(row + top_k + k[None, :], mask=m, other=-1)
    tl.store(ids_ptr + r[:, None] * top_k + k[None, :], ids, mask=m)
    slot = tl.load(words_ptr + r * row_words + 2 * top_k, mask=rm, other=-1)
    tl.store(slot_ptr + r, slot, mask=rm)


@triton.jit
def _combine_kernel(out_ptr, stride_out, pos_ptr, num_tokens, num_out, num_dest, capacity, me,
                    y_ptr, stride_y, back_ptr, stride_back, ovf_ptr, stride_ovf, ovf_off_ptr,
                    hidden, BYPASS: tl.constexpr, HAS_OVF: tl.constexpr,
                    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[i] = sum over d of token i's result from destination d``, destinations in
    order, accumulated in fp32 (fp64 for fp64) and rounded once; rows ``>= num_tokens`` of
    ``out`` (padding of the share) are zero. A token's own rank's result is read from the
    experts' output (``BYPASS``, always set when ``P == 1``), the peers' from the return buffer in send-block order, and
    rows past the capacity from the overflow return buffer at ``ovf_off[d]``."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_share = i < num_tokens
    for h0 in range(0, hidden, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h[None, :] < hidden
        if ACC_F64:
            acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for d in range(0, num_dest):
            pos = tl.load(pos_ptr + i * num_dest + d, mask=in_share, other=-1).to(tl.int64)
            main = (pos >= 0) & (pos < capacity)
            if BYPASS:
                dv = tl.zeros([BLOCK_M], dtype=tl.int64) + d  # a tensor: masks need one
                own = main & (dv == me)
                peer = main & (dv != me)
                peer_blk = dv - (dv > me).to(tl.int64)
                v = tl.load(y_ptr + pos[:, None] * stride_y + h[None, :],
                            mask=own[:, None] & hm, other=0)
                acc += v.to(acc.dtype)
            else:
                peer = main
                peer_blk = d
            v = tl.load(back_ptr + (peer_blk * capacity + pos)[:, None] * stride_back + h[None, :],
                        mask=peer[:, None] & hm, other=0)
            acc += v.to(acc.dtype)
            if HAS_OVF:
                extra = pos >= capacity
                off = tl.load(ovf_off_ptr + d).to(tl.int64)
                v = tl.load(ovf_ptr + (off + pos - capacity)[:, None] * stride_ovf + h[None, :],
                            mask=extra[:, None] & hm, other=0)
                acc += v.to(acc.dtype)
        tl.store(out_ptr + i[:, None] * stride_out + h[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(i < num_out)[:, None] & hm)
