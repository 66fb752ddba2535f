"""Triton kernel: the down LoRA of decode-sized calls, shrink and expand in one launch AFTER
the base down GEMM, added into its output in place.

Imports triton only. ``out[pair] += topk_w[pair] * (h A_down^T) B_down^T`` for the pairs of one
base-alignment block (rows of one expert, ordered by slot) and one range of H columns per
program. Why: at decode sizes an expert block holds a few rows of several slots, and the LoRA
expand in the down epilogue made every one of the block's ``H / block_n`` n-tile programs walk
those slots after its K loop (a chain of dependent loads per slot), so the extra time grew with
the number of n-tiles, not with the adapter bytes. Here a block's programs are few (``split``
along H), each computes the block's down shrink itself (``NUM_RUNS`` slot runs stacked on the N
axis of one dot, as ``_down_shrink_runs_kernel``; ``h`` and ``A_down`` re-read from L2 once per
split) and then expands over its columns; a block without LoRA rows returns after its prologue.

The base down kernel has already multiplied its product by the top-k weight and stored it in
the output dtype; the delta is multiplied by the same weight and added in fp32, then rounded
again (one more rounding of the output than the epilogue path: within the bf16 tolerance of the
tests, and the same for every request whatever the others hold).

Isolation as in ``kernel_gate_up.py``: each row keeps its own run's band of the stacked shrink
by a select (other bands hold products with other slots' factors), and the expand multiplies
those exact zeros by finite-selected ``B_down`` tiles; rows without an enabled slot are never
read or written here.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import (
    _block_rows, _finite_or_zero, _row_runs, _row_slots, _stacked_slots)


@triton.jit
def _down_lora_kernel(h_ptr, a_ptr, b_ptr, b_shared_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                      block_bucket_ptr, num_post_pad_ptr, token_slot_ptr, slot_enabled_ptr,
                      slot_rank_ptr, num_pairs, top_k, hidden, inter, cols_per_split,
                      stride_as, stride_ae, stride_ar, stride_ai,
                      stride_bs, stride_be, stride_bh, stride_br,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, NUM_RUNS: tl.constexpr):
    """Program ``(block, s)``: the block's rows with a slot, columns ``[s * cols_per_split,
    (s + 1) * cols_per_split)`` of H (``cols_per_split`` a multiple of ``BLOCK_N``)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    slot_m = _row_slots(rows // top_k, row_mask, token_slot_ptr, slot_enabled_ptr,
                        slot_rank_ptr)
    run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_M)
    weight = tl.load(topk_w_ptr + rows, mask=row_mask, other=0.0)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, hidden)
    for first in range(0, num_runs, NUM_RUNS):
        slot_q, band_q, r_q = _stacked_slots(run_m, slot_m, first, NUM_RUNS, BLOCK_R)
        has_q = slot_q >= 0
        rank_q = tl.load(slot_rank_ptr + slot_q, mask=has_q, other=0)
        slot64_q = slot_q.to(tl.int64)
        in_chunk = (run_m >= first) & (run_m < first + NUM_RUNS)
        # The shrink of this chunk's runs: [BLOCK_M, NUM_RUNS * BLOCK_R] fp32.
        a_base = (a_ptr + slot64_q[None, :] * stride_as + expert * stride_ae
                  + r_q[None, :] * stride_ar)
        acc = tl.zeros([BLOCK_M, NUM_RUNS * BLOCK_R], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            h = tl.load(h_ptr + rows[:, None] * inter + offs_k[None, :],
                        mask=in_chunk[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_base + offs_k[:, None] * stride_ai,
                        mask=k_mask[:, None] & (r_q < rank_q)[None, :], other=0.0)
            acc += tl.dot(h, a.to(h.dtype))
        # Each row keeps its own run's band: a select, never a product with a mask.
        own = (run_m[:, None] - first) == band_q[None, :]
        d = tl.where(own & in_chunk[:, None], acc, 0.0)
        shared_q = tl.load(b_shared_ptr + slot_q, mask=has_q, other=0) != 0
        eb_q = tl.where(shared_q, 0, expert)  # a shared B_down sits at expert 0
        b_base = (b_ptr + slot64_q[:, None] * stride_bs + eb_q[:, None] * stride_be
                  + r_q[:, None] * stride_br)
        b_rows = (r_q < rank_q)[:, None]
        for n0 in tl.range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            b = tl.load(b_base + offs_n[None, :] * stride_bh, mask=b_rows & n_mask[None, :],
                        other=0.0)
            delta = tl.dot(d, _finite_or_zero(b))
            o_ptrs = out_ptr + rows[:, None] * hidden + offs_n[None, :]
            o_mask = in_chunk[:, None] & n_mask[None, :]
            o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
            tl.store(o_ptrs, (o + weight[:, None] * delta).to(out_ptr.dtype.element_ty),
                     mask=o_mask)
