"""Triton kernels of block-FP8 GEMMs (imports triton only).

``_quant_act_tile`` quantizes a ``[BLOCK_M, 128]`` activation tile in registers, one scale per
row (per token and 128-column group, dynamic), and is shared with the MoE GEMMs
(``moe_gemm/kernel_gate_up.py``, ``kernel_down.py``) when they quantize in their K loop.
``_quant_act_kernel`` writes the same values once to memory (e4m3 ``[T, K]`` + fp32 scales
``[T, ceil(K / 128)]``), for GEMMs that read their activations pre-quantized: every N tile of a
GEMM then loads one byte per value through its pipelined loads instead of re-quantizing two
bytes per value in registers. ``_block_fp8_linear_kernel`` is the
dense/attention projection: ``y = x W^T (+ bias)`` with ``W`` e4m3 ``[N, K]`` and fp32 block
scales ``[ceil(N / block_n), ceil(K / 128)]``; per 128-column step, ``dot(q_x, q_w)`` (fp32
accumulation) times the token's activation scale and the weight block's scale; at decode sizes
K is split over programs (fp32 partials, ``_split_sum_kernel`` adds them in order).
"""

import triton
import triton.language as tl

from moelora_dist.kernels import constants

FP8_MAX = tl.constexpr(constants.FP8_MAX)
AMAX_FLOOR = tl.constexpr(constants.FP8_AMAX_FLOOR)


@triton.jit
def _quant_act_tile(x):
    """``(q, s)``: e4m3 values of the tile and each row's fp32 scale (row amax / 448)."""
    xf = x.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(xf), axis=1), AMAX_FLOOR) / FP8_MAX
    q = tl.clamp(xf / s[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    return q, s


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, num_rows, k_in, stride_xt, stride_xk, stride_qt,
                      stride_st, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, 128]`` group of rows: e4m3 values and one scale per row
    (``BLOCK_K == 128``); columns past ``k_in`` are zeros (they never raise a scale)."""
    pid_m = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < num_rows
    mask = m_mask[:, None] & (offs_k < k_in)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk, mask=mask,
                other=0.0)
    q, s = _quant_act_tile(x)
    tl.store(q_ptr + offs_m[:, None] * stride_qt + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * stride_st + kb, s, mask=m_mask)


@triton.jit
def _block_fp8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, num_rows, n_out, k_in,
                             k_per_split, scale_bn, stride_xt, stride_xk, stride_wn, stride_wk,
                             stride_sn, stride_sk, stride_yt, part_stride,
                             HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile over the columns ``[k_per_split * s, ...)`` of split
    ``s = program_id(2)``: with ``SPLIT`` its fp32 partial goes to ``part[s]`` (summed in split
    order by ``_split_sum_kernel``), else ``y`` (+ bias) directly."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < num_rows
    n_mask = offs_n < n_out
    s_row = s_ptr + (offs_n // scale_bn) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_in)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # BLOCK_K == 128: one activation group per step
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_in
        x = tl.load(x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        xq, xs = _quant_act_tile(x)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        ws = tl.load(s_row + (k0 // BLOCK_K) * stride_sk, mask=n_mask, other=0.0)
        acc += tl.dot(xq, w) * (xs[:, None] * ws[None, :])
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_s * part_stride + offs_m[:, None] * n_out + offs_n[None, :],
                 acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, n_out, num_splits, part_stride, stride_yt,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``y[t, tile] = sum_s part[s, t, tile] (+ bias)``, the splits added in order (the same
    bits on every run)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sp in range(0, num_splits):
        acc += tl.load(part_ptr + sp * part_stride + t * n_out + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
