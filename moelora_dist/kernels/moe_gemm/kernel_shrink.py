"""Triton kernel: LoRA shrink of gate_up, ``x A^T`` for blocks of one (slot, expert).

Imports triton only. Items are (token, k) pairs of slots whose A is per expert, and whole
tokens of slots whose A is shared by all experts (computed once per token, read at expert 0
with an expert stride of 0 -- the bucket of such a token is ``slot * E + 0``). The H axis may
be split over the grid's second axis: program ``(block, s)`` sums H columns
``[s * k_per_split, (s + 1) * k_per_split)`` into partial buffer ``s``; the gate_up expand
adds the partials in a fixed order (deterministic, no atomics). The down shrink splits its
I axis the same way (``num_dparts`` partials, summed by the down expand).
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import (
    NO_SLOT, _block_rows, _next_slot, _row_runs, _row_slots, _stacked_slots)


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, a_shared_ptr, slot_rank_ptr, sorted_ids_ptr,
                        block_bucket_ptr, num_post_pad_ptr, out_ptr,
                        num_items, num_pairs, top_k, num_experts, hidden, half_rows,
                        k_per_split, part_stride,
                        stride_xt, stride_xh, stride_as, stride_ae, stride_ar, stride_ah,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[s, item, :BLOCK_R] = x A_gate^T, out[s, item, BLOCK_R:] = x A_up^T over the H
    columns of split ``s`` (fp32; columns past the slot's rank are written as zeros and never
    read as data)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    bucket, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_items, BLOCK_M)
    if bucket < 0:
        return
    slot = (bucket // num_experts).to(tl.int64)
    expert = (bucket % num_experts).to(tl.int64)
    shared = tl.load(a_shared_ptr + slot) != 0
    ea = tl.where(shared, 0, expert)
    rank = tl.load(slot_rank_ptr + slot)
    tok = tl.where(rows < num_pairs, rows // top_k, rows - num_pairs)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = a_ptr + slot * stride_as + ea * stride_ae
    acc_g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # k_per_split is a multiple of BLOCK_K: a split's last tile ends at the next split's start
    # or is masked at H.
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, hidden), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_off = offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ah
        ab_mask = r_mask[None, :] & k_mask[:, None]
        a_g = tl.load(a_base + a_off, mask=ab_mask, other=0.0).to(x.dtype)
        a_u = tl.load(a_base + half_rows * stride_ar + a_off, mask=ab_mask, other=0.0)
        acc_g += tl.dot(x, a_g)
        acc_u += tl.dot(x, a_u.to(x.dtype))
    out = out_ptr + pid_s * part_stride + rows[:, None] * (2 * BLOCK_R) + offs_r[None, :]
    tl.store(out, acc_g, mask=row_mask[:, None])
    tl.store(out + BLOCK_R, acc_u, mask=row_mask[:, None])


@triton.jit
def _down_shrink_kernel(h_ptr, a_ptr, sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                        token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, out_ptr,
                        num_pairs, top_k, inter, k_per_split, part_stride,
                        stride_as, stride_ae, stride_ar, stride_ai,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[s, pair, :BLOCK_R] = h A_down^T over the I columns of split ``s`` for the pairs of
    one expert block, slot by slot (the rows of a block are sorted by slot, so this reads the
    block's ``h`` once or twice)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, inter)
    out_ptr += pid_s * part_stride
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    slot_m = _row_slots(rows // top_k, row_mask, token_slot_ptr, slot_enabled_ptr,
                        slot_rank_ptr)
    offs_r = tl.arange(0, BLOCK_R)
    slot = _next_slot(slot_m, -1)
    while slot != NO_SLOT:
        sel = slot_m == slot
        slot64 = slot.to(tl.int64)
        r_mask = offs_r < tl.load(slot_rank_ptr + slot64)
        a_base = a_ptr + slot64 * stride_as + expert * stride_ae + offs_r[None, :] * stride_ar
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            h = tl.load(h_ptr + rows[:, None] * inter + offs_k[None, :],
                        mask=sel[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_base + offs_k[:, None] * stride_ai,
                        mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.dot(h, a.to(h.dtype))
        tl.store(out_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], acc, mask=sel[:, None])
        slot = _next_slot(slot_m, slot)


@triton.jit
def _down_shrink_runs_kernel(h_ptr, a_ptr, sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                             token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, out_ptr,
                             num_pairs, top_k, inter, k_per_split, part_stride, stride_as,
                             stride_ae, stride_ar, stride_ai, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                             NUM_RUNS: tl.constexpr):
    """``_down_shrink_kernel`` with ``NUM_RUNS`` slot runs stacked on the N axis of one dot:
    the block's ``h`` is read once per ``NUM_RUNS`` runs (not once per slot), and each row
    keeps the band of its own run."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, inter)
    out_ptr += pid_s * part_stride
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    slot_m = _row_slots(rows // top_k, row_mask, token_slot_ptr, slot_enabled_ptr,
                        slot_rank_ptr)
    run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, NUM_RUNS)
    for first in range(0, num_runs, NUM_RUNS):
        slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
        rank_q = tl.load(slot_rank_ptr + slot_q, mask=slot_q >= 0, other=0)
        a_base = (a_ptr + slot_q[None, :].to(tl.int64) * stride_as + expert * stride_ae
                  + r_q[None, :] * stride_ar)
        in_chunk = (run_m >= first) & (run_m < first + NUM_RUNS)
        acc = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            h = tl.load(h_ptr + rows[:, None] * inter + offs_k[None, :],
                        mask=in_chunk[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_base + offs_k[:, None] * stride_ai,
                        mask=k_mask[:, None] & (r_q < rank_q)[None, :], other=0.0)
            acc += tl.dot(h, a.to(h.dtype))
        acc3 = tl.reshape(acc, (BLOCK_M, NUM_RUNS, BLOCK_R))
        own = (run_m - first)[:, None, None] == offs_j[None, :, None]
        out = tl.sum(tl.where(own, acc3, 0.0), axis=1)
        tl.store(out_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], out,
                 mask=in_chunk[:, None])
