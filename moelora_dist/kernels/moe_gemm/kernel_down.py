"""Triton kernels: grouped down GEMM + LoRA expand + top-k weight, and the top-k sum.

Imports triton only. The LoRA delta of down is added to the accumulator BEFORE the top-k
weight multiplies it, so the weight is applied once to base + delta. The down shrink comes in
``num_dparts`` fp32 partial buffers (1 from the down shrink kernel, one per gate_up n-tile when
the gate_up epilogue computed it), added in a fixed order. Isolation as in
``kernel_gate_up.py``: shrink values of other slots are exact zeros, factor tiles are selected
finite. FP8 experts (``W_FP8``) quantize ``h`` per pair and 128 columns in the K loop, or read
it quantized (``X_FP8``: e4m3 ``h`` and its ``[T*K, ceil(I_l / 128)]`` scales);
``WS_PER_TILE`` as in ``kernel_gate_up.py``.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.block_fp8.kernel import _quant_act_tile
from moelora_dist.kernels.moe_gemm.kernel_common import (
    NO_SLOT, _block_rows, _finite_or_zero, _fp8_step, _load_parts, _next_slot, _row_runs,
    _row_slots, _stacked_slots, _tile_of, _w_scale_row)


@triton.jit
def _runs_expand_tiles(first, run_m, slot_m, rank_m, rows, expert, offs_n, n_mask, dshrink_ptr,
                       b_ptr, b_shared_ptr, slot_rank_ptr, num_dparts, dpart_stride,
                       stride_bs, stride_be, stride_bh, stride_br, NUM_RUNS: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """Shrink ``[BLOCK_M, NUM_RUNS * BLOCK_R]`` and stacked ``B_down`` ``[NUM_RUNS * BLOCK_R,
    BLOCK_N]`` tiles of the slot runs ``first .. first + NUM_RUNS - 1``; runs that do not
    exist load as zeros (masked: no memory traffic)."""
    slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
    d_mask = (run_m[:, None] == first + band_q[None, :]) & (r_q[None, :] < rank_m[:, None])
    d = _load_parts(dshrink_ptr + rows[:, None] * BLOCK_R + r_q[None, :], d_mask, num_dparts,
                    dpart_stride)
    has_q = slot_q >= 0
    rank_q = tl.load(slot_rank_ptr + slot_q, mask=has_q, other=0)
    # A shared B_down sits at expert 0: expert stride 0, no copy.
    shared_q = tl.load(b_shared_ptr + slot_q, mask=has_q, other=0) != 0
    eb_q = tl.where(shared_q, 0, expert)
    b = tl.load(b_ptr + slot_q[:, None].to(tl.int64) * stride_bs + eb_q[:, None] * stride_be
                + offs_n[None, :] * stride_bh + r_q[:, None] * stride_br,
                mask=(r_q < rank_q)[:, None] & n_mask[None, :], other=0.0)
    return d, b


@triton.jit
def _slot_expand_tiles(slot, slot_m, rows, expert, offs_n, n_mask, dshrink_ptr, b_ptr,
                       b_shared_ptr, slot_rank_ptr, num_dparts, dpart_stride, stride_bs,
                       stride_be, stride_bh, stride_br, BLOCK_R: tl.constexpr):
    """Shrink ``[BLOCK_M, BLOCK_R]`` and ``B_down`` ``[BLOCK_R, BLOCK_N]`` tiles of one slot of
    the block (zeros for ``NO_SLOT``: every load masked)."""
    is_slot = slot != NO_SLOT
    slot64 = tl.where(is_slot, slot, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < tl.load(slot_rank_ptr + slot64, mask=is_slot, other=0)
    eb = tl.where(tl.load(b_shared_ptr + slot64, mask=is_slot, other=0) != 0, 0, expert)
    d = _load_parts(dshrink_ptr + rows[:, None] * BLOCK_R + offs_r[None, :],
                    (slot_m == slot)[:, None] & r_mask[None, :], num_dparts, dpart_stride)
    b = tl.load(b_ptr + slot64 * stride_bs + eb * stride_be + offs_n[None, :] * stride_bh
                + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :],
                other=0.0)
    return d, b


@triton.jit(do_not_specialize=["group_m"])
def _down_kernel(h_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, block_bucket_ptr,
                 num_post_pad_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                 b_shared_ptr, dshrink_ptr, b_ptr, bias_ptr,
                 num_pairs, top_k, hidden, inter, num_dparts, dpart_stride,
                 stride_we, stride_wh, stride_wi, stride_bs, stride_be, stride_bh, stride_br,
                 ws_ptr, scale_bn, stride_se, stride_sn, stride_sk, hs_ptr, stride_hst,
                 stride_bias_e, group_m,
                 HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RUN_LOOP: tl.constexpr,
                 NUM_RUNS: tl.constexpr, W_FP8: tl.constexpr, X_FP8: tl.constexpr,
                 HAS_BIAS: tl.constexpr, WS_PER_TILE: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """out[pair, n-tile] = topk_w[pair] * (h W_down^T + dshrink B_down^T [+ bias]); the bias
    (``HAS_BIAS``, gpt-oss) is given to one rank of a MoE-TP group only."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _tile_of(pid, tl.cdiv(hidden, BLOCK_N), group_m)
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    if HAS_LORA:
        # PREFETCH: the expand's first factor and shrink tiles are loaded BEFORE the base K
        # loop, so their latency (a dependent chain of slot, rank and partial-sum loads) hides
        # behind it instead of following it (decode blocks hold rows of several slots); they
        # stay live in registers through the loop, which large tiles may not afford.
        slot_m = _row_slots(rows // top_k, row_mask, token_slot_ptr, slot_enabled_ptr,
                            slot_rank_ptr)
        if RUN_LOOP:
            run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                        token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                                        BLOCK_M)
            rank_m = tl.load(slot_rank_ptr + slot_m, mask=slot_m >= 0, other=0)
            if PREFETCH:
                d, b = _runs_expand_tiles(0, run_m, slot_m, rank_m, rows, expert, offs_n, n_mask,
                                          dshrink_ptr, b_ptr, b_shared_ptr, slot_rank_ptr,
                                          num_dparts, dpart_stride, stride_bs, stride_be,
                                          stride_bh, stride_br, NUM_RUNS, BLOCK_R)
        else:
            slot = _next_slot(slot_m, -1)
            if PREFETCH:
                d, b = _slot_expand_tiles(slot, slot_m, rows, expert, offs_n, n_mask, dshrink_ptr,
                                          b_ptr, b_shared_ptr, slot_rank_ptr, num_dparts,
                                          dpart_stride, stride_bs, stride_be, stride_bh,
                                          stride_br, BLOCK_R)
    w_base = w_ptr + expert * stride_we + offs_n[None, :] * stride_wh
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if W_FP8:
        # FP8 experts: h quantized per pair and 128 columns (BLOCK_K == 128), as for gate_up.
        s_row = _w_scale_row(ws_ptr + expert * stride_se, 0, pid_n * BLOCK_N, offs_n, scale_bn,
                             stride_sn, WS_PER_TILE)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            h = tl.load(h_ptr + rows[:, None] * inter + offs_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if X_FP8:  # quantized before the launch (block_fp8.ops.quantize_act)
                hq = h
                hs = tl.load(hs_ptr + rows * stride_hst + k0 // BLOCK_K, mask=row_mask,
                             other=0.0)
            else:
                hq, hs = _quant_act_tile(h)
            w = tl.load(w_base + offs_k[:, None] * stride_wi,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _fp8_step(acc, tl.dot(hq, w), hs, s_row, k0 // BLOCK_K, stride_sk, n_mask,
                            WS_PER_TILE)
    else:
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            h = tl.load(h_ptr + rows[:, None] * inter + offs_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + offs_k[:, None] * stride_wi,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(h, w.to(h.dtype))

    if HAS_LORA:
        if RUN_LOOP:
            # NUM_RUNS slot runs per dot (see kernel_gate_up.py); a block without LoRA rows
            # adds one dot of zeros (every load of its tiles was masked).
            if not PREFETCH:
                d, b = _runs_expand_tiles(0, run_m, slot_m, rank_m, rows, expert, offs_n, n_mask,
                                          dshrink_ptr, b_ptr, b_shared_ptr, slot_rank_ptr,
                                          num_dparts, dpart_stride, stride_bs, stride_be,
                                          stride_bh, stride_br, NUM_RUNS, BLOCK_R)
            acc += tl.dot(d, _finite_or_zero(b))
            # num_stages=1: not software-pipelined (see kernel_gate_up.py)
            for first in tl.range(NUM_RUNS, num_runs, NUM_RUNS, num_stages=1):
                d, b = _runs_expand_tiles(first, run_m, slot_m, rank_m, rows, expert, offs_n,
                                          n_mask, dshrink_ptr, b_ptr, b_shared_ptr,
                                          slot_rank_ptr, num_dparts, dpart_stride, stride_bs,
                                          stride_be, stride_bh, stride_br, NUM_RUNS, BLOCK_R)
                acc += tl.dot(d, _finite_or_zero(b))
        else:
            # One slot at a time (see kernel_gate_up.py for when each loop is used); the next
            # slot's tiles load before this one's dot.
            if not PREFETCH:
                d, b = _slot_expand_tiles(slot, slot_m, rows, expert, offs_n, n_mask, dshrink_ptr,
                                          b_ptr, b_shared_ptr, slot_rank_ptr, num_dparts,
                                          dpart_stride, stride_bs, stride_be, stride_bh,
                                          stride_br, BLOCK_R)
            while slot != NO_SLOT:
                acc += tl.dot(d, _finite_or_zero(b))
                slot = _next_slot(slot_m, slot)
                d, b = _slot_expand_tiles(slot, slot_m, rows, expert, offs_n, n_mask,
                                          dshrink_ptr, b_ptr, b_shared_ptr, slot_rank_ptr,
                                          num_dparts, dpart_stride, stride_bs, stride_be,
                                          stride_bh, stride_br, BLOCK_R)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask,
                       other=0.0).to(tl.float32)[None, :]
    weight = tl.load(topk_w_ptr + rows, mask=row_mask, other=0.0)
    acc = acc * weight[:, None]
    tl.store(out_ptr + rows[:, None] * hidden + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _topk_rows_sum(out_ptr, topk_ids_ptr, t, offs, h_mask, top_k, num_experts, stride_out,
                   BLOCK_H: tl.constexpr):
    """sum over k of out[t*K + k, offs] (fp32, in k order) for the pairs whose expert is valid
    on this rank; the others were never written (their rows hold garbage) and are never
    read. Shared with the residual add + norm that sums a one-GPU layer's pairs itself."""
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, top_k):
        # Broadcast the scalar expert id to the tile: a scalar & vector mask is rejected by
        # the interpreter.
        e = tl.load(topk_ids_ptr + t * top_k + k + tl.zeros([BLOCK_H], dtype=tl.int64))
        ok = h_mask & (e >= 0) & (e < num_experts)
        acc += tl.load(out_ptr + (t * top_k + k) * stride_out + offs, mask=ok,
                       other=0.0).to(tl.float32)
    return acc


@triton.jit
def _topk_sum_kernel(out_ptr, topk_ids_ptr, y_ptr, hidden, top_k, num_experts,
                     stride_yt, BLOCK_H: tl.constexpr):
    """y[t] = :func:`_topk_rows_sum` of token t."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs < hidden
    acc = _topk_rows_sum(out_ptr, topk_ids_ptr, t, offs, h_mask, top_k, num_experts, hidden,
                         BLOCK_H)
    tl.store(y_ptr + t * stride_yt + offs, acc.to(y_ptr.dtype.element_ty), mask=h_mask)
