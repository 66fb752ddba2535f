"""Triton kernel: the down LoRA expand of decode-sized calls, in a launch of its own AFTER the
base down GEMM, added into its output in place.

Imports triton only. ``out[pair, n-tile] += topk_w[pair] * dshrink[pair] B_down^T`` for the
pairs of one base-alignment block (rows of one expert, ordered by slot) and one n-tile per
program; ``dshrink`` comes from the down shrink kernel (its partials summed in a fixed order).
Why: at decode sizes an expert block holds a few rows of several slots, and the expand in the
down epilogue made every n-tile program of the (long) base down GEMM walk those slots after its
K loop, a chain of dependent loads that each wave of programs paid again: 22 us per layer at 64
sequences on an H200 for ~6 us of factor bytes. Here the programs are small (one dot of the
block's stacked slot runs), many fit an SM at once, and a block without LoRA rows returns after
its prologue. A first version computed the down shrink inside these programs too (no shrink
launch): each program then re-ran the shrink's loop over I, and the launch took 52 us against
the 34 us of the shrink launch and the epilogue expand together.

The base down kernel has already multiplied its product by the top-k weight and stored it in
the output dtype; the delta is multiplied by the same weight and added in fp32, then rounded
again (one more rounding of the output than the epilogue path: within the bf16 tolerance of the
tests, and the same for every request whatever the others hold).

Isolation as in ``kernel_down.py``: a row's shrink sits in its own run's band of the stacked
dot (zeros elsewhere), and the factor tiles are selected finite; rows without an enabled slot
are never read or written here.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import (
    _block_rows, _finite_or_zero, _row_runs, _row_slots)
from moelora_dist.kernels.moe_gemm.kernel_down import _runs_expand_tiles


@triton.jit
def _down_expand_kernel(out_ptr, topk_w_ptr, sorted_ids_ptr, block_bucket_ptr,
                        num_post_pad_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                        b_shared_ptr, dshrink_ptr, b_ptr, num_pairs, top_k, hidden,
                        num_dparts, dpart_stride, stride_bs, stride_be, stride_bh, stride_br,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        NUM_RUNS: tl.constexpr):
    """Program ``(block, n-tile)``: the block's rows with a slot, ``NUM_RUNS`` slot runs per
    dot."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                         pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    slot_m = _row_slots(rows // top_k, row_mask, token_slot_ptr, slot_enabled_ptr,
                        slot_rank_ptr)
    run_m, num_runs = _row_runs(sorted_ids_ptr, pid_m, slot_m, num_pairs, top_k,
                                token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_M)
    if num_runs == 0:
        return
    rank_m = tl.load(slot_rank_ptr + slot_m, mask=slot_m >= 0, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first in tl.range(0, num_runs, NUM_RUNS, num_stages=1):
        d, b = _runs_expand_tiles(first, run_m, slot_m, rank_m, rows, expert, offs_n, n_mask,
                                  dshrink_ptr, b_ptr, b_shared_ptr, slot_rank_ptr, num_dparts,
                                  dpart_stride, stride_bs, stride_be, stride_bh, stride_br,
                                  NUM_RUNS, BLOCK_R)
        acc += tl.dot(d, _finite_or_zero(b))
    has = slot_m >= 0
    weight = tl.load(topk_w_ptr + rows, mask=has, other=0.0)
    o_ptrs = out_ptr + rows[:, None] * hidden + offs_n[None, :]
    o_mask = has[:, None] & n_mask[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + weight[:, None] * acc).to(out_ptr.dtype.element_ty), mask=o_mask)
