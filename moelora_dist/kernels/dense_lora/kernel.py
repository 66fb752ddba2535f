"""Triton kernels of the dense-LoRA family (imports triton only; host glue in ``ops.py``).

Tokens come sorted by slot in blocks of ``BLOCK_M`` (the align family, ``mode="lora_pairs"``
with one "expert"): every block belongs to one slot, so a program reads that slot's factors
and writes only that slot's rows; padding rows and sentinel blocks are never computed.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.moe_gemm.kernel_common import _block_rows


@triton.jit
def _dense_shrink_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, slot_rank_ptr, sorted_ids_ptr,
                         block_bucket_ptr, num_post_pad_ptr, out_ptr, num_tokens, in_dim,
                         stride_xt, stride_xi, stride_as, stride_ar, stride_ai,
                         stride_om, stride_ot,
                         NUM_MODULES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[j, t, :BLOCK_R] = x[t] a_j[slot]^T (fp32) for the tokens of one block, for up to
    three modules that read the same x (q/k/v, gate/up): x is read once for all of them."""
    pid_m = tl.program_id(0).to(tl.int64)
    slot, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                       pid_m, num_tokens, BLOCK_M)
    if slot < 0:
        return
    slot = slot.to(tl.int64)
    rank = tl.load(slot_rank_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    a_off = slot * stride_as + offs_r[None, :] * stride_ar
    for k0 in range(0, in_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_dim
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
    out = out_ptr + rows[:, None] * stride_ot + offs_r[None, :]
    tl.store(out, acc0, mask=row_mask[:, None])
    if NUM_MODULES > 1:
        tl.store(out + stride_om, acc1, mask=row_mask[:, None])
    if NUM_MODULES > 2:
        tl.store(out + 2 * stride_om, acc2, mask=row_mask[:, None])


@triton.jit
def _dense_expand_kernel(y_ptr, shrink_ptr, b_ptr, slot_rank_ptr, sorted_ids_ptr,
                         block_bucket_ptr, num_post_pad_ptr, num_tokens, out_dim,
                         stride_yt, stride_yo, stride_st, stride_bs, stride_bo, stride_br,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[t, n-tile] += shrink[t] b[slot, n-tile]^T for the tokens of one block (fp32 sum,
    rounded once to y's dtype)."""
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(out_dim, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    slot, rows, row_mask = _block_rows(sorted_ids_ptr, block_bucket_ptr, num_post_pad_ptr,
                                       pid_m, num_tokens, BLOCK_M)
    if slot < 0:
        return
    slot = slot.to(tl.int64)
    rank = tl.load(slot_rank_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_dim
    s = tl.load(shrink_ptr + rows[:, None] * stride_st + offs_r[None, :],
                mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bo
                + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :],
                other=0.0).to(tl.float32)
    delta = tl.dot(s, b)
    y_off = rows[:, None] * stride_yt + offs_n[None, :] * stride_yo
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)
