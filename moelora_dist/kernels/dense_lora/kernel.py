"""Triton kernels of the dense-LoRA family (imports triton only; host glue in ``ops.py``).

Tokens come sorted by slot in blocks of ``BLOCK_M`` (the align family, ``mode="lora_pairs"``
with one "expert"): every block belongs to one slot, so a program reads that slot's factors
and writes only that slot's rows; padding rows and sentinel blocks are never computed.

The shrink splits the input features over several programs per block, each writing its own
fp32 partial sum (no atomics: the result does not depend on which program ends first); the
expand adds the partials in a fixed order. At decode sizes a block holds a handful of rows and
a whole-K loop per block is all latency; split, the loop is that many times shorter and the
GPU has that many more programs in flight.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import _block_rows


@triton.jit
def _slot_block(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr, slot_rank_ptr, pid_m,
                num_tokens, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Slot (int64, -1: skip the block), rows and row mask of block ``pid_m``, and the rank
    columns its slot uses."""
    slot, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                       pid_m, num_tokens, BLOCK_M)
    slot = slot.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    rank = tl.load(slot_rank_ptr + tl.maximum(slot, 0))
    return slot, rows, row_mask, offs_r, offs_r < rank


@triton.jit
def _dense_shrink_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, slot_rank_ptr, sorted_ids_ptr,
                         block_bucket_ptr, num_post_pad_ptr, out_ptr, num_tokens, in_dim,
                         k_per_split, stride_xt, stride_xi, stride_as, stride_ar, stride_ai,
                         stride_osp, stride_om, stride_ot,
                         NUM_MODULES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[split, j, t, :BLOCK_R] = x[t, K chunk] a_j[slot, :, K chunk]^T (fp32) for the tokens
    of one block and one chunk of ``k_per_split`` input features (a multiple of BLOCK_K), for
    up to three modules that read the same x (q/k/v): x is read once for all of them."""
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slot, rows, row_mask, offs_r, r_mask = _slot_block(
        sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr, slot_rank_ptr, pid_m, num_tokens,
        BLOCK_M, BLOCK_R)
    if slot < 0:
        return
    acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    a_off = slot * stride_as + offs_r[None, :] * stride_ar
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_dim)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xi,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        ak = a_off + offs_k[:, None] * stride_ai
        am = k_mask[:, None] & r_mask[None, :]
        # x's dtype on the tensor cores with an fp32 accumulator (A is the pool's dtype)
        acc0 += tl.dot(x, tl.load(a0_ptr + ak, mask=am, other=0.0).to(x.dtype))
        if NUM_MODULES > 1:
            acc1 += tl.dot(x, tl.load(a1_ptr + ak, mask=am, other=0.0).to(x.dtype))
        if NUM_MODULES > 2:
            acc2 += tl.dot(x, tl.load(a2_ptr + ak, mask=am, other=0.0).to(x.dtype))
    out = out_ptr + split * stride_osp + rows[:, None] * stride_ot + offs_r[None, :]
    tl.store(out, acc0, mask=row_mask[:, None])
    if NUM_MODULES > 1:
        tl.store(out + stride_om, acc1, mask=row_mask[:, None])
    if NUM_MODULES > 2:
        tl.store(out + 2 * stride_om, acc2, mask=row_mask[:, None])


@triton.jit
def _expand_tile(y_ptr, b_ptr, s, slot, rows, row_mask, offs_r, r_mask, tile_n, out_dim,
                 stride_yt, stride_yo, stride_bs, stride_bo, stride_br,
                 BLOCK_N: tl.constexpr):
    """y[rows, n-tile] += s b[slot, n-tile]^T (fp32 sum, rounded once to y's dtype)."""
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_dim
    b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bo
                + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :],
                other=0.0).to(tl.float32)
    delta = tl.dot(s, b)
    y_off = rows[:, None] * stride_yt + offs_n[None, :] * stride_yo
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dense_expand_kernel(y0_ptr, y1_ptr, y2_ptr, b0_ptr, b1_ptr, b2_ptr, shrink_ptr,
                         slot_rank_ptr, sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                         num_tokens, out0, out1, out2, tiles0, tiles1,
                         sy0t, sy0o, sy1t, sy1o, sy2t, sy2o,
                         sb0s, sb0o, sb0r, sb1s, sb1o, sb1r, sb2s, sb2o, sb2r,
                         num_splits, stride_ssp, stride_sm, stride_st,
                         NUM_MODULES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, UNROLL: tl.constexpr):
    """The expand of up to three modules in one launch: program (block, n-tile) with n-tiles
    numbered across the modules (``tiles0`` of module 0, then ``tiles1`` of module 1, then
    module 2's); its module's shrink is the sum of the ``num_splits`` partials, in order (a
    runtime loop over chunks of ``UNROLL`` partials whose loads are issued together: a split
    count that changes with the batch compiles no new variant)."""
    pid_m = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    slot, rows, row_mask, offs_r, r_mask = _slot_block(
        sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr, slot_rank_ptr, pid_m, num_tokens,
        BLOCK_M, BLOCK_R)
    if slot < 0:
        return
    module = 0
    if NUM_MODULES > 1:
        module = tl.where(tile >= tiles0, 1, 0)
    if NUM_MODULES > 2:
        module = tl.where(tile >= tiles0 + tiles1, 2, module)
    s_ptr = shrink_ptr + module * stride_sm + rows[:, None] * stride_st + offs_r[None, :]
    s_mask = row_mask[:, None] & r_mask[None, :]
    s = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for sp0 in range(0, num_splits, UNROLL):
        for j in tl.static_range(UNROLL):
            live = (offs_r * 0 + sp0 + j) < num_splits  # a tile: the interpreter's masks
            part = tl.load(s_ptr + (sp0 + j) * stride_ssp, mask=s_mask & live[None, :],
                           other=0.0)
            s = tl.where(live[None, :], s + part, s)  # past the last split: s unchanged
    if module == 0:
        _expand_tile(y0_ptr, b0_ptr, s, slot, rows, row_mask, offs_r, r_mask, tile, out0,
                     sy0t, sy0o, sb0s, sb0o, sb0r, BLOCK_N)
    elif module == 1:
        _expand_tile(y1_ptr, b1_ptr, s, slot, rows, row_mask, offs_r, r_mask, tile - tiles0,
                     out1, sy1t, sy1o, sb1s, sb1o, sb1r, BLOCK_N)
    else:
        _expand_tile(y2_ptr, b2_ptr, s, slot, rows, row_mask, offs_r, r_mask,
                     tile - tiles0 - tiles1, out2, sy2t, sy2o, sb2s, sb2o, sb2r, BLOCK_N)


# --- The expand inside a per-token consumer kernel (the page write, the residual add + norm):
# the token's summed shrink and the delta of some of its output features, computed where the
# consumer loads them, so that no expand launch runs between the base GEMM and the consumer.

@triton.jit
def _token_shrink(shrink_ptr, module, t, num_splits, stride_ssp, stride_sm, stride_st,
                  token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, BLOCK_R: tl.constexpr):
    """Token ``t``'s shrink of ``module`` (fp32 ``[BLOCK_R]``: the partials of
    :func:`_dense_shrink_kernel` added in split order), its slot (int64, 0 when it has none)
    and the rank columns to use (none when the token's slot is -1, disabled or of rank 0:
    the tokens the shrink plan leaves out, whose rows were never written)."""
    slot = tl.load(token_slot_ptr + t).to(tl.int64)
    safe = tl.maximum(slot, 0)
    rank = tl.load(slot_rank_ptr + safe)
    enabled = tl.load(slot_enabled_ptr + safe).to(tl.int32)
    rank = tl.where((slot >= 0) & (enabled != 0), rank, 0)  # no columns: no delta
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    ptr = shrink_ptr + module * stride_sm + t * stride_st + offs_r
    for sp in range(0, num_splits):
        s += tl.load(ptr + sp * stride_ssp, mask=r_mask, other=0.0)
    return s, safe, r_mask


@triton.jit
def _delta_1d(b_ptr, slot, offs_o, o_mask, s, r_mask, stride_bs, stride_bo, stride_br,
              BLOCK_R: tl.constexpr):
    """``delta[o] = sum_r s[r] b[slot, o, r]`` (fp32) for output features ``offs_o [N]``."""
    offs_r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + slot * stride_bs + offs_o[:, None] * stride_bo
                + offs_r[None, :] * stride_br, mask=o_mask[:, None] & r_mask[None, :],
                other=0.0).to(tl.float32)
    return tl.sum(b * s[None, :], 1)


@triton.jit
def _delta_2d(b_ptr, slot, offs_o, o_mask, s, r_mask, stride_bs, stride_bo, stride_br,
              BLOCK_R: tl.constexpr):
    """:func:`_delta_1d` for a 2-D tile of output features ``offs_o [A, B]``."""
    offs_r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + slot * stride_bs + offs_o[:, :, None] * stride_bo
                + offs_r[None, None, :] * stride_br,
                mask=o_mask[:, :, None] & r_mask[None, None, :], other=0.0).to(tl.float32)
    return tl.sum(b * s[None, None, :], 2)
