"""Triton kernels of the fused residual-add + RMSNorm (glue in ``ops.py``): the plain one, one
that adds a LoRA expand to the delta first (``_add_rms_norm_lora_kernel``), one whose delta is
the top-k sum of a MoE layer's pair rows (``_add_topk_rms_norm_kernel``)."""

import triton
import triton.language as tl

from moelora_dist.kernels.dense_lora.kernel import _delta_1d, _token_shrink
from moelora_dist.kernels.moe_gemm.kernel_down import _topk_rows_sum


@triton.jit
def _store_norm(h, w_ptr, out_ptr, row, offs, ok, hidden, eps, stride_o):
    """``out[row] = round(w * round(h * rsqrt(mean(h^2) + eps)))`` of the row ``h`` (in its
    dtype), the statistics in fp32 (transformers' rounding points)."""
    x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / hidden
    y = (x * tl.rsqrt(var + eps)).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, hidden, eps, stride_h, stride_d,
                         stride_o, HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row: ``h = round(h + d)`` stored back, ``out = round(w * round(h * rsqrt(mean(h^2)
    + eps)))`` with the statistics in fp32 (transformers' rounding points)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < hidden
    h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
    _store_norm(h, w_ptr, out_ptr, row, offs, ok, hidden, eps, stride_o)


@triton.jit
def _add_rms_norm_lora_kernel(h_ptr, d_ptr, w_ptr, out_ptr, hidden, eps, stride_h, stride_d,
                              stride_o, shrink_ptr, num_splits, stride_ssp, stride_sm,
                              stride_st, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                              b_ptr, stride_bs, stride_bo, stride_br,
                              BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One row of :func:`_add_rms_norm_kernel` whose ``d`` (a base output, o's) still lacks
    its LoRA delta: ``d' = round(d + b[slot] s)`` (fp32 sum, rounded once, as the expand
    launch stores it), ``h = round(h + d')`` stored back, then the norm. Two passes over
    ``BLOCK_C`` columns (the delta tile of a whole row would not fit in registers): the first
    adds and stores ``h`` and sums its squares, the second reads ``h`` back and normalizes."""
    row = tl.program_id(0).to(tl.int64)
    s, slot, r_mask = _token_shrink(shrink_ptr, 0, row, num_splits, stride_ssp, stride_sm,
                                    stride_st, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                                    BLOCK_R)
    sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, hidden, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < hidden
        h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
        d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0)
        dt = h.dtype
        delta = _delta_1d(b_ptr, slot, offs, ok, s, r_mask, stride_bs, stride_bo, stride_br,
                          BLOCK_R)
        d = (d.to(tl.float32) + delta).to(d.dtype)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dt)
        tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
        x = h.to(tl.float32)
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, 0) / hidden + eps)
    tl.debug_barrier()  # the second pass reads what the first stored
    for c0 in range(0, hidden, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < hidden
        h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
        y = (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def _add_topk_rms_norm_kernel(h_ptr, pairs_ptr, topk_ids_ptr, plus_ptr, w_ptr, out_ptr, hidden,
                              top_k, num_experts, eps, stride_h, stride_p, stride_plus,
                              stride_o, HAS_PLUS: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row of :func:`_add_rms_norm_kernel` whose ``d`` is the sum of its token's ``top_k``
    pair rows (a MoE layer's weighted expert outputs): the sum as ``topk_sum`` makes it (fp32
    in k order, pairs of invalid experts never read, rounded once to the pairs' dtype), then
    ``h = round(h + d)`` stored back and the norm; with ``HAS_PLUS`` ``d = round(d + plus)``
    first (the shared experts' output, as ``y + shared``). The same bits as the launches."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < hidden
    acc = _topk_rows_sum(pairs_ptr, topk_ids_ptr, row, offs, ok, top_k, num_experts, stride_p,
                         BLOCK_H)
    h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
    d = acc.to(pairs_ptr.dtype.element_ty)
    if HAS_PLUS:
        plus = tl.load(plus_ptr + row * stride_plus + offs, mask=ok, other=0.0)
        d = (d.to(tl.float32) + plus.to(tl.float32)).to(d.dtype)
    h = (h.to(tl.float32) + d.to(tl.float32)).to(h.dtype)
    tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
    _store_norm(h, w_ptr, out_ptr, row, offs, ok, hidden, eps, stride_o)
