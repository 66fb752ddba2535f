"""Triton kernels of the paged-attention family (imports triton only; host glue in ``ops.py``).

``_paged_attention_kernel``: one program per (block of ``BLOCK_Q`` new tokens of one sequence,
kv head). The ``g`` query heads that share the kv head are stacked with the tokens into the
rows of one tile (``BLOCK_Q * BLOCK_G`` rows), so every key tile is loaded once for all of them.
Programs are numbered over the whole step: sequence ``b``'s blocks start at
``seg_indptr[b] // BLOCK_Q + b`` (an upper bound of the blocks before it), so the grid
``T // BLOCK_Q + B`` depends on the step's sizes only and a CUDA graph can capture it; each
program finds its sequence by binary search and spare programs return at once. Keys are read
in tiles of ``BLOCK_N`` positions, each position through the block table (any page size, pages
anywhere), with an online softmax in fp32; positions at or past the sequence's length are
masked on load, so a reused page's stale values are never read. ``HAS_SINKS`` (gpt-oss): the
online softmax starts from each row's sink logit with weight 1 (max = sink, sum = 1), so the
sink joins the normalization and adds nothing to the output. ``SPLIT``: a third grid axis
splits each tile's keys; the programs write fp32 partials that ``_paged_combine_kernel`` merges,
or, with ``FUSED``, the last of a tile's programs to arrive (a per-tile atomic counter) merges.
Both merges are :func:`_merge_splits`, in split order from memory: the same bits either way,
whatever order the programs run in.

``_rope_write_kernel``: one program per token: per-head RMSNorm of q and k (Qwen3), rotary
embedding from the fp32 tables, q stored to a new tensor, k and v stored into their page slot.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.dense_lora.kernel import _delta_2d, _token_shrink

LOG2E = 1.4426950408889634  # the host's scale factor (ops.py)
_LOG2E = tl.constexpr(LOG2E)  # the same inside kernels (globals there must be constexpr)


@triton.jit
def _find_sequence(seg_indptr_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first block number ``seg[b] // BLOCK_Q + b`` is <= ``pid``."""
    lo = tl.zeros([], dtype=tl.int32)  # tensors, not constants: num_seqs == 1 is specialized
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(seg_indptr_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile(seg_indptr_ptr, kv_lens_ptr, num_seqs, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
          GROUP: tl.constexpr):
    """The rows of program ``program_id(0)``: its sequence ``b``, token block and lengths, and
    per row the token, query head and validity; ``spare`` for a program with no rows."""
    pid = tl.program_id(0)
    b = _find_sequence(seg_indptr_ptr, pid, num_seqs, BLOCK_Q)
    # int32 positions whatever the metadata's dtype (the engine's plans carry int64)
    q_start = tl.load(seg_indptr_ptr + b).to(tl.int32)
    q_len = tl.load(seg_indptr_ptr + b + 1).to(tl.int32) - q_start
    blk = pid - (q_start // BLOCK_Q + b)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    ctx = kv_len - q_len  # keys cached before this step's tokens of the sequence
    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = blk * BLOCK_Q + offs_m // BLOCK_G
    head = offs_m % BLOCK_G
    row_ok = (tok < q_len) & (head < GROUP)
    return blk * BLOCK_Q >= q_len, b, blk, q_start, q_len, kv_len, ctx, tok, head, row_ok


@triton.jit
def _softmax_start(sinks_ptr, h_idx, row_ok, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_SINKS: tl.constexpr):
    """``(max, sum, acc)`` of an online softmax before any key: empty, or with ``HAS_SINKS``
    the row's sink logit as one more term (log2 units, as the scores; max = sink, sum = 1)."""
    if HAS_SINKS:
        m = tl.load(sinks_ptr + h_idx, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
        l = tl.full([ROWS], 1.0, dtype=tl.float32)
    else:
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l = tl.zeros([ROWS], dtype=tl.float32)
    return m, l, tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)


@triton.jit
def _merge_splits(out_ptr, sinks_ptr, part_ptr, part_ml_ptr, base, num_splits, t_idx, h_idx,
                  row_ok, offs_d, stride_ot, stride_oh, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr,
                  UNROLL: tl.constexpr, CHUNK_D: tl.constexpr):
    """Head-dim columns ``offs_d`` (``CHUNK_D`` of them) of out = the softmax-weighted merge of
    partials ``base .. base + num_splits - 1``, in that order (the sink, when there is one,
    first: max = sink, sum = 1, nothing added). Each column's merge is independent of the
    others', so any chunking of the head gives the same bits."""
    rows = tl.arange(0, ROWS)
    m, l, acc = _softmax_start(sinks_ptr, h_idx, row_ok, ROWS, CHUNK_D, HAS_SINKS)
    # UNROLL splits per step, unrolled: their loads do not depend on each other's merge, so
    # they are issued together (a loop of one split per step waited for each in turn: 4.6 us
    # per layer at 1 sequence for 8 splits on an H200). Splits past num_splits load nothing and
    # change nothing (a select), so the merge is the same, in split order, for any unroll.
    for s0 in range(0, num_splits, UNROLL):
        for j in tl.static_range(UNROLL):
            s = s0 + j
            live = (rows * 0 + s) < num_splits  # a tile, not a scalar: the interpreter's masks
            ml = part_ml_ptr + (base + s) * (2 * ROWS) + rows
            m_s = tl.load(ml, mask=live, other=float("-inf"))
            l_s = tl.load(ml + ROWS, mask=live, other=0.0)
            a_s = tl.load(part_ptr + (base + s) * (ROWS * BLOCK_D) + rows[:, None] * BLOCK_D
                          + offs_d[None, :], mask=live[:, None], other=0.0)
            m_new = tl.maximum(m, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            beta = tl.exp2(m_s - m_safe)
            l = tl.where(live, l * alpha + l_s * beta, l)
            acc = tl.where(live[:, None], acc * alpha[:, None] + a_s * beta[:, None], acc)
            m = tl.where(live, m_new, m)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + t_idx[:, None] * stride_ot + h_idx[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _paged_attention_kernel(q_ptr, k_pages_ptr, v_pages_ptr, out_ptr, block_tables_ptr,
                            kv_lens_ptr, seg_indptr_ptr, sinks_ptr, part_ptr, part_ml_ptr,
                            counter_ptr, num_seqs, qk_scale, window, num_splits,
                            stride_qt, stride_qh, stride_ot, stride_oh,
                            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                            stride_bt,
                            PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
                            SPLIT: tl.constexpr, FUSED: tl.constexpr, UNROLL: tl.constexpr,
                            CHUNK_D: tl.constexpr):
    """out[t, h] = softmax(q[t, h] K^T * scale + causal/window mask) V for one tile of rows.

    ``qk_scale`` is ``scale * log2(e)`` (exp2 below); ``window`` 0 means no sliding window.
    ``SPLIT``: program ``(block, kv head, s)`` reads only part ``s`` of ``num_splits`` of the
    block's keys and writes its unnormalized sum and its softmax max and sum (log2 units) to the
    partial buffers (sinks join only the merge), merged by :func:`_paged_combine_kernel` or,
    with ``FUSED``, here: each program adds 1 to the tile's int32 counter (``counter_ptr``, 0
    on entry) after its stores; the one that sees ``num_splits - 1`` merges every partial of
    the tile ``CHUNK_D`` columns at a time and puts the counter back to 0.
    """
    pid = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    spare, b, blk, q_start, q_len, kv_len, ctx, tok, head, row_ok = _tile(
        seg_indptr_ptr, kv_lens_ptr, num_seqs, BLOCK_Q, BLOCK_G, GROUP)
    if spare:
        return
    q_pos = ctx + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t_idx = (q_start + tok).to(tl.int64)
    h_idx = kvh * GROUP + head
    q = tl.load(q_ptr + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i, l_i, acc = _softmax_start(sinks_ptr, h_idx, row_ok, BLOCK_Q * BLOCK_G, BLOCK_D,
                                   HAS_SINKS and not SPLIT)
    # Keys this block can see: up to its last query position; from its first query's window.
    hi = tl.minimum(kv_len, ctx + tl.minimum(q_len, (blk + 1) * BLOCK_Q))
    first = tl.maximum(ctx + blk * BLOCK_Q - window + 1, 0)
    lo = tl.where(window > 0, (first // BLOCK_N) * BLOCK_N, 0)
    if SPLIT:  # this program's share, whole key tiles (lo is a tile boundary)
        split = tl.program_id(2)
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    bt = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(bt + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        within = (offs_n % PAGE_SIZE).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_pages_ptr + page[:, None] * stride_kp + within[:, None] * stride_ks
                    + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        see = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if window > 0:
            see = see & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_pages_ptr + page[:, None] * stride_vp + within[:, None] * stride_vs
                    + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLIT:
        rows = tl.arange(0, BLOCK_Q * BLOCK_G)
        part = (pid * tl.num_programs(1) + kvh) * num_splits + tl.program_id(2)
        tl.store(part_ptr + part * (BLOCK_Q * BLOCK_G * BLOCK_D) + rows[:, None] * BLOCK_D
                 + offs_d[None, :], acc)
        ml = part_ml_ptr + part * (2 * BLOCK_Q * BLOCK_G) + rows
        tl.store(ml, m_i)
        tl.store(ml + BLOCK_Q * BLOCK_G, l_i)
        if FUSED:
            tile = pid * tl.num_programs(1) + kvh
            tl.debug_barrier()  # every thread's partial stores come before the release
            # acq_rel at GPU scope: releases this program's partials; the last arriver's
            # acquire makes every other program's partials visible to its plain loads below
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                for c0 in range(0, BLOCK_D, CHUNK_D):
                    _merge_splits(out_ptr, sinks_ptr, part_ptr, part_ml_ptr,
                                  tile * num_splits, num_splits, t_idx, h_idx, row_ok,
                                  c0 + tl.arange(0, CHUNK_D), stride_ot, stride_oh,
                                  BLOCK_Q * BLOCK_G, BLOCK_D, HEAD_DIM, HAS_SINKS, UNROLL,
                                  CHUNK_D)
                tl.atomic_xchg(counter_ptr + tile, 0)  # for the next call on this stream
        return
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + t_idx[:, None] * stride_ot + h_idx[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_combine_kernel(out_ptr, seg_indptr_ptr, kv_lens_ptr, sinks_ptr, part_ptr,
                          part_ml_ptr, num_seqs, num_splits, stride_ot, stride_oh,
                          GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_SINKS: tl.constexpr, UNROLL: tl.constexpr,
                          CHUNK_D: tl.constexpr):
    """:func:`_merge_splits` of one tile's ``num_splits`` partials as a launch of its own:
    program ``(block, kv head, c)`` merges head-dim columns ``[c * CHUNK_D, (c + 1) *
    CHUNK_D)`` (every chunk reads the same maxima and sums)."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    spare, b, blk, q_start, q_len, kv_len, ctx, tok, head, row_ok = _tile(
        seg_indptr_ptr, kv_lens_ptr, num_seqs, BLOCK_Q, BLOCK_G, GROUP)
    if spare:
        return
    offs_d = tl.program_id(2) * CHUNK_D + tl.arange(0, CHUNK_D)
    _merge_splits(out_ptr, sinks_ptr, part_ptr, part_ml_ptr,
                  (pid * tl.num_programs(1) + kvh) * num_splits, num_splits,
                  (q_start + tok).to(tl.int64), kvh * GROUP + head, row_ok, offs_d, stride_ot,
                  stride_oh, BLOCK_Q * BLOCK_G, BLOCK_D, HEAD_DIM, HAS_SINKS, UNROLL, CHUNK_D)


@triton.jit
def _load_halves(x_ptr, heads, offs_h, offs_d, NUM_HEADS: tl.constexpr, HALF: tl.constexpr):
    """Both halves ``[len(offs_h), len(offs_d)]`` of rows ``offs_h`` of one token's
    ``[N, D]`` projection at ``x_ptr`` (head stride ``heads``), in its dtype, and their mask."""
    m = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    ptr = x_ptr + offs_h[:, None] * heads + offs_d[None, :]
    return tl.load(ptr, mask=m, other=0.0), tl.load(ptr + HALF, mask=m, other=0.0), m


@triton.jit
def _norm_rope_values(x1, x2, w_ptr, cos, sin, offs_d, eps, HALF: tl.constexpr,
                      HEAD_NORM: tl.constexpr):
    """Optional per-head RMSNorm of the halves ``x1, x2`` (transformers' rounding: normalized
    in fp32, cast, scaled in the input dtype), then the rotary embedding, in fp32."""
    d_ok = offs_d < HALF
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if HEAD_NORM:
        var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
        r = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _norm_rope(x_ptr, w_ptr, cos, sin, heads, offs_h, offs_d, eps,
               NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEAD_NORM: tl.constexpr):
    """Rows ``offs_h`` of one token's ``[N, D]`` projection at ``x_ptr`` (head stride
    ``heads``): :func:`_load_halves` then :func:`_norm_rope_values`."""
    x1, x2, m = _load_halves(x_ptr, heads, offs_h, offs_d, NUM_HEADS, HALF)
    y1, y2 = _norm_rope_values(x1, x2, w_ptr, cos, sin, offs_d, eps, HALF, HEAD_NORM)
    return y1, y2, m


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
                       k_pages_ptr, v_pages_ptr, q_norm_ptr, k_norm_ptr, eps,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_ot, stride_oh, stride_cos, stride_slot, stride_ph,
                       NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       HEAD_NORM: tl.constexpr):
    """Token ``t``: norm + rotate q into ``q_out``; norm + rotate k and copy v into the slot
    ``slot_mapping[t]`` of the pages (``stride_slot``: one token of a page, pages contiguous);
    a slot ``-1`` stores nothing."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0)
    q1, q2, qm = _norm_rope(q_ptr + t * stride_qt, q_norm_ptr, cos, sin, stride_qh, offs_h,
                            offs_d, eps, NUM_Q, HALF, HEAD_NORM)
    o = q_out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o, q1.to(q_out_ptr.dtype.element_ty), mask=qm)
    tl.store(o + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=qm)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        k1, k2, km = _norm_rope(k_ptr + t * stride_kt, k_norm_ptr, cos, sin, stride_kh, offs_h,
                                offs_d, eps, NUM_KV, HALF, HEAD_NORM)
        dst = slot.to(tl.int64) * stride_slot + offs_h[:, None] * stride_ph + offs_d[None, :]
        tl.store(k_pages_ptr + dst, k1.to(k_pages_ptr.dtype.element_ty), mask=km)
        tl.store(k_pages_ptr + dst + HALF, k2.to(k_pages_ptr.dtype.element_ty), mask=km)
        src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        tl.store(v_pages_ptr + dst, tl.load(src, mask=km, other=0.0), mask=km)
        tl.store(v_pages_ptr + dst + HALF, tl.load(src + HALF, mask=km, other=0.0), mask=km)


@triton.jit
def _load_with_delta(x_ptr, heads, module, t, offs_h, offs_d, shrink_ptr, num_splits,
                     stride_ssp, stride_sm, stride_st, token_slot_ptr, slot_enabled_ptr,
                     slot_rank_ptr, b_ptr, stride_bs, stride_bo, stride_br,
                     NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """:func:`_load_halves` of heads ``offs_h`` of token ``t`` with their LoRA delta (the
    shrink of group module ``module`` times ``b``; projection row ``h * D + d``) added in fp32
    and rounded once to their dtype, as the expand launch would have stored them."""
    x1, x2, m = _load_halves(x_ptr, heads, offs_h, offs_d, NUM_HEADS, HALF)
    s, slot, r_mask = _token_shrink(shrink_ptr, module, t, num_splits, stride_ssp, stride_sm,
                                    stride_st, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                                    BLOCK_R)
    rows = offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    d1 = _delta_2d(b_ptr, slot, rows, m, s, r_mask, stride_bs, stride_bo, stride_br, BLOCK_R)
    d2 = _delta_2d(b_ptr, slot, rows + HALF, m, s, r_mask, stride_bs, stride_bo, stride_br,
                   BLOCK_R)
    dt = x1.dtype
    return (x1.to(tl.float32) + d1).to(dt), (x2.to(tl.float32) + d2).to(dt), m


@triton.jit
def _rope_write_lora_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
                            k_pages_ptr, v_pages_ptr, q_norm_ptr, k_norm_ptr, eps,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_ot, stride_oh, stride_cos, stride_slot, stride_ph,
                            shrink_ptr, num_splits, stride_ssp, stride_sm, stride_st,
                            token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                            bq_ptr, bk_ptr, bv_ptr, sbq_s, sbq_o, sbq_r, sbk_s, sbk_o, sbk_r,
                            sbv_s, sbv_o, sbv_r, q_groups,
                            NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
                            HEAD_GROUP: tl.constexpr, BLOCK_HALF: tl.constexpr,
                            BLOCK_R: tl.constexpr, HEAD_NORM: tl.constexpr):
    """:func:`_rope_write_kernel` with the q/k/v LoRA expand fused in: program ``(t, g)``
    takes ``HEAD_GROUP`` query heads (``g < q_groups``) or kv heads (the rest) of token ``t``,
    adds each head's delta (``shrink`` of module 0/1/2 = q/k/v times its ``b``) to the loaded
    projection, rounded once, then norms, rotates and stores as the plain kernel does."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0)
    if g < q_groups:
        offs_h = g * HEAD_GROUP + tl.arange(0, HEAD_GROUP)
        x1, x2, qm = _load_with_delta(q_ptr + t * stride_qt, stride_qh, 0, t, offs_h, offs_d,
                                      shrink_ptr, num_splits, stride_ssp, stride_sm, stride_st,
                                      token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, bq_ptr,
                                      sbq_s, sbq_o, sbq_r, NUM_Q, HALF, BLOCK_R)
        q1, q2 = _norm_rope_values(x1, x2, q_norm_ptr, cos, sin, offs_d, eps, HALF, HEAD_NORM)
        o = q_out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o, q1.to(q_out_ptr.dtype.element_ty), mask=qm)
        tl.store(o + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=qm)
    else:
        page_slot = tl.load(slot_ptr + t)
        if page_slot >= 0:
            offs_h = (g - q_groups) * HEAD_GROUP + tl.arange(0, HEAD_GROUP)
            dst = (page_slot.to(tl.int64) * stride_slot + offs_h[:, None] * stride_ph
                   + offs_d[None, :])
            x1, x2, km = _load_with_delta(k_ptr + t * stride_kt, stride_kh, 1, t, offs_h,
                                          offs_d, shrink_ptr, num_splits, stride_ssp, stride_sm,
                                          stride_st, token_slot_ptr, slot_enabled_ptr,
                                          slot_rank_ptr, bk_ptr, sbk_s, sbk_o, sbk_r, NUM_KV,
                                          HALF, BLOCK_R)
            k1, k2 = _norm_rope_values(x1, x2, k_norm_ptr, cos, sin, offs_d, eps, HALF,
                                       HEAD_NORM)
            tl.store(k_pages_ptr + dst, k1.to(k_pages_ptr.dtype.element_ty), mask=km)
            tl.store(k_pages_ptr + dst + HALF, k2.to(k_pages_ptr.dtype.element_ty), mask=km)
            v1, v2, vm = _load_with_delta(v_ptr + t * stride_vt, stride_vh, 2, t, offs_h,
                                          offs_d, shrink_ptr, num_splits, stride_ssp, stride_sm,
                                          stride_st, token_slot_ptr, slot_enabled_ptr,
                                          slot_rank_ptr, bv_ptr, sbv_s, sbv_o, sbv_r, NUM_KV,
                                          HALF, BLOCK_R)
            tl.store(v_pages_ptr + dst, v1.to(v_pages_ptr.dtype.element_ty), mask=vm)
            tl.store(v_pages_ptr + dst + HALF, v2.to(v_pages_ptr.dtype.element_ty), mask=vm)
