"""PyTorch references of block-FP8 GEMMs: dequantized weights, simulated activation quantization.

Legend: T tokens, N output features, K input features, Kb = ceil(K / 128) column groups.

The kernels compute ``sum over groups g of (q_x[t, g] . q_w[n, g]) * s_x[t, g] * s_w[n, g]`` in
fp32, with ``q_x`` the e4m3 activations of token ``t`` in group ``g`` and ``s_x`` their scale
(group amax / 448). That is exactly ``fake_quant(x) @ dequantize(w)^T``, which is what these
references compute, in fp32 (fp64 for fp64 inputs). No Triton import here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora_dist.kernels.constants import FP8_AMAX_FLOOR, FP8_GROUP, FP8_MAX
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight


def quantize_act(x_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-128-column e4m3 quantization.

    Args: x_TK ``[T, K]`` any float dtype.
    Returns: ``q_TK`` float8_e4m3fn ``[T, K]`` and ``s_TKb`` fp32 ``[T, Kb]`` with
    ``x ~= q * s`` (``s`` = group amax / 448, amax floored at 1e-10).
    """
    T, K = x_TK.shape
    Kb = -(-K // FP8_GROUP)
    xf = F.pad(x_TK.float(), (0, Kb * FP8_GROUP - K)).view(T, Kb, FP8_GROUP)
    s = xf.abs().amax(-1).clamp(min=FP8_AMAX_FLOOR) / FP8_MAX
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(T, Kb * FP8_GROUP)[:, :K], s


def fake_quant_act(x_TK: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` after e4m3 quantization and back (``[T, K]`` in ``dtype``): what a block-FP8 GEMM
    effectively multiplies."""
    q, s = quantize_act(x_TK)
    K = x_TK.shape[1]
    return (q.to(dtype) * s.to(dtype).repeat_interleave(FP8_GROUP, dim=1)[:, :K])


def dequantize(w: BlockFP8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., N, K]`` values of a block-FP8 weight in ``dtype``."""
    N, K = w.weight.shape[-2:]
    s = w.scale_inv.to(dtype).repeat_interleave(w.block_n, dim=-2)[..., :N, :]
    s = s.repeat_interleave(FP8_GROUP, dim=-1)[..., :K]
    return w.weight.to(dtype) * s


def block_fp8_linear(x_TK: torch.Tensor, w: BlockFP8Weight,
                     bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`ops.block_fp8_linear`: ``fake_quant(x) @ dequantize(w)^T (+ bias)``.

    Args: x_TK ``[T, K]`` bf16/fp16/fp32/fp64; w ``[N, K]`` block-FP8; bias_N ``[N]`` or None.
    Returns: ``[T, N]`` in ``x_TK.dtype``.
    """
    compute = torch.float64 if x_TK.dtype == torch.float64 else torch.float32
    y = fake_quant_act(x_TK, compute) @ dequantize(w, compute).T
    if bias_N is not None:
        y = y + bias_N.to(compute)
    return y.to(x_TK.dtype)


def quantize_weight(w_NK: torch.Tensor, scale_fmt: str = "float") -> BlockFP8Weight:
    """Block-quantize a float weight the way FP8 checkpoints are made (scale = block amax / 448;
    ``ue8m0``: the scale rounded up to a power of two). For tests and benchmarks: a real
    checkpoint arrives quantized."""
    *lead, N, K = w_NK.shape
    Nb, Kb = -(-N // FP8_GROUP), -(-K // FP8_GROUP)
    wp = F.pad(w_NK.float(), (0, Kb * FP8_GROUP - K, 0, Nb * FP8_GROUP - N))
    blocks = wp.reshape(*lead, Nb, FP8_GROUP, Kb, FP8_GROUP)
    amax = blocks.abs().amax(dim=(-3, -1))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (blocks / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, Nb * FP8_GROUP, Kb * FP8_GROUP)[..., :N, :K].contiguous()
    return BlockFP8Weight(q, s.contiguous(), FP8_GROUP)
