"""Host glue of the block-FP8 dense linear (the attention and dense-MLP projections of an FP8
checkpoint on the GPU): one launch, no host sync, CUDA-graph safe.

``torch._scaled_mm`` is not used: its block-scaled (128x128 weight, 1x128 activation) mode
could not be verified on the GPU machine's torch 2.11 from here, and this kernel is tested
against :func:`.naive.block_fp8_linear` under the interpreter and on the GPU.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.block_fp8.kernel import _block_fp8_linear_kernel, _quant_act_kernel
from moelora_dist.kernels.constants import FP8_GROUP
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight


def block_fp8_linear(x_TK: torch.Tensor, w: BlockFP8Weight, bias_N: torch.Tensor | None = None,
                     *, block_m: int | None = None, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``x @ w^T (+ bias)`` with ``x`` quantized per token and 128 columns on the fly.

    Args:
        x_TK: ``[T, K]`` bf16/fp16/fp32 (any strides); w: ``[N, K]`` block-FP8.
        bias_N: ``[N]`` or None. block_m: rows per tile (default by T: 16 up to 64 rows).
    Returns:
        ``[T, N]`` in ``x_TK.dtype`` (fp32 accumulation).
    """
    T, K = x_TK.shape
    N, K2 = w.weight.shape
    assert K2 == K, (w.weight.shape, x_TK.shape)
    y = torch.empty(T, N, dtype=x_TK.dtype, device=x_TK.device)
    if T == 0:
        return y
    bm = block_m or (16 if T <= 16 else (32 if T <= 64 else 64))
    grid = (triton.cdiv(T, bm), triton.cdiv(N, block_n))
    s = w.scale_inv
    _block_fp8_linear_kernel[grid](
        x_TK, w.weight, s, bias_N if bias_N is not None else y, y, T, N, K, w.block_n,
        x_TK.stride(0), x_TK.stride(1), w.weight.stride(0), w.weight.stride(1),
        s.stride(0), s.stride(1), y.stride(0), HAS_BIAS=bias_N is not None, BLOCK_M=bm,
        BLOCK_N=block_n, BLOCK_K=FP8_GROUP, num_warps=num_warps, num_stages=num_stages)
    return y


def quantize_act(x_TK: torch.Tensor, *, block_m: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`.naive.quantize_act`: ``x`` quantized per row and 128 columns.

    Args: x_TK ``[T, K]`` bf16/fp16/fp32 (any strides).
    Returns: ``q_TK`` float8_e4m3fn ``[T, K]`` and ``s_TKb`` fp32 ``[T, ceil(K / 128)]``, the
    values and scales the in-loop quantization of the GEMMs computes (bit for bit).
    """
    T, K = x_TK.shape
    Kb = triton.cdiv(K, FP8_GROUP)
    q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x_TK.device)
    s = torch.empty(T, Kb, dtype=torch.float32, device=x_TK.device)
    if T:
        _quant_act_kernel[(triton.cdiv(T, block_m), Kb)](
            x_TK, q, s, T, K, x_TK.stride(0), x_TK.stride(1), q.stride(0), s.stride(0),
            BLOCK_M=block_m, BLOCK_K=FP8_GROUP, num_warps=4)
    return q, s
