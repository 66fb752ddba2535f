"""Triton kernel of the fused residual-add + RMSNorm (imports triton only; glue in ``ops.py``)."""

import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, hidden, eps, stride_h, stride_d,
                         stride_o, HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row: ``h = round(h + d)`` stored back, ``out = round(w * round(h * rsqrt(mean(h^2)
    + eps)))`` with the statistics in fp32 (transformers' rounding points)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < hidden
    h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
    dt = h.dtype
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dt)
        tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
    x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / hidden
    y = (x * tl.rsqrt(var + eps)).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=ok)
