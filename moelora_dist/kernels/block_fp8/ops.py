"""Host glue of the block-FP8 dense linear (the attention and dense-MLP projections of an FP8
checkpoint on the GPU): one launch, no host sync, CUDA-graph safe.

``torch._scaled_mm`` is not used: its block-scaled (128x128 weight, 1x128 activation) mode
could not be verified on the GPU machine's torch 2.11 from here, and this kernel is tested
against :func:`.naive.block_fp8_linear` under the interpreter and on the GPU.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.block_fp8.kernel import (_block_fp8_linear_kernel, _quant_act_kernel,
                                                   _split_sum_kernel)
from moelora_dist.kernels.constants import FP8_GROUP
from moelora_dist.kernels.device import num_sms, split_columns, splits_to_fill
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight


# Split K until a launch has about this many programs per SM (each split at least
# MIN_SPLIT_STEPS 128-column steps). H200, Qwen3-30B-A3B's projections at 64 tokens (S9/3,
# `launches --fp8`): without the split, q/k/v (N 5120, K 2048) and o (N 2048, K 4096) ran 160
# and 64 programs of 16 and 32 steps on 132 SMs, 111 us per layer against 23 us for the bf16
# cuBLAS GEMMs that read twice the bytes.
PROGRAMS_PER_SM = 2
MIN_SPLIT_STEPS = 2
# Whether a launch with ``split_k=None`` splits by :func:`split_k_for` (else one program per
# tile along K, as before the split existed). Off until it has run on a GPU: it was built and
# tested under the interpreter on 2026-12-04 when no device machine was left to the session;
# `benchmarks/device/with_constants.py` turns it on for an A/B
# (moelora_dist.kernels.block_fp8.ops:AUTO_SPLIT=true).
AUTO_SPLIT = False
SUM_BLOCK_N = 1024  # columns per program of the partials' sum


def split_k_for(T: int, N: int, K: int, block_m: int, block_n: int, sms: int) -> int:
    """K splits of a ``[T, K] x [K, N]`` launch: 1 when its tiles already fill
    ``PROGRAMS_PER_SM * sms`` programs, else enough to, keeping ``MIN_SPLIT_STEPS`` steps each."""
    tiles = triton.cdiv(T, block_m) * triton.cdiv(N, block_n)
    return splits_to_fill(tiles, triton.cdiv(K, FP8_GROUP), sms, MIN_SPLIT_STEPS,
                          per_sm=PROGRAMS_PER_SM)


def block_fp8_linear(x_TK: torch.Tensor, w: BlockFP8Weight, bias_N: torch.Tensor | None = None,
                     *, block_m: int | None = None, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 3,
                     split_k: int | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias)`` with ``x`` quantized per token and 128 columns on the fly.

    Args:
        x_TK: ``[T, K]`` bf16/fp16/fp32 (any strides); w: ``[N, K]`` block-FP8.
        bias_N: ``[N]`` or None. block_m: rows per tile (default by T: 16 up to 16 rows, 32
            up to 64, else 64).
        split_k: programs along K per tile (None: :func:`split_k_for` with
            :data:`AUTO_SPLIT`, else 1); above 1 each writes an fp32 partial and a second
            launch adds them in order (deterministic).
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
    if split_k is None:
        split_k = split_k_for(T, N, K, bm, block_n, num_sms(x_TK.device)) if AUTO_SPLIT else 1
    k_per_split, parts = split_columns(K, split_k, FP8_GROUP)
    part = (torch.empty(parts, T, N, dtype=torch.float32, device=x_TK.device) if parts > 1
            else y)  # y: never read or written as a partial
    bias = bias_N if bias_N is not None else y
    grid = (triton.cdiv(T, bm), triton.cdiv(N, block_n), parts)
    s = w.scale_inv
    _block_fp8_linear_kernel[grid](
        x_TK, w.weight, s, bias, y, part, T, N, K, k_per_split, w.block_n,
        x_TK.stride(0), x_TK.stride(1), w.weight.stride(0), w.weight.stride(1),
        s.stride(0), s.stride(1), y.stride(0), T * N, HAS_BIAS=bias_N is not None,
        SPLIT=parts > 1, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=FP8_GROUP,
        num_warps=num_warps, num_stages=num_stages)
    if parts > 1:
        _split_sum_kernel[(T, triton.cdiv(N, SUM_BLOCK_N))](
            part, bias, y, N, parts, T * N, y.stride(0), HAS_BIAS=bias_N is not None,
            BLOCK_N=SUM_BLOCK_N, num_warps=4)
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
