"""Small numerics shared by the decoder layers, written to match transformers 5 bit for bit in
fp32 (same op order, same casts).

Legend: T tokens, H hidden, D head dim, N heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_first: bool = False) -> torch.Tensor:
    """HF ``RMSNorm``: normalize the last dim in fp32, cast back, then scale.

    Args: x ``[..., H]`` any float dtype; weight ``[H]``. Returns ``[..., H]`` in x's dtype
    (or the promoted dtype of weight and x, as HF does). ``weight_first``: gpt-oss's variant,
    the weight multiplies the fp32 normalized value and the product is cast to x's dtype.
    """
    # F.rms_norm is one fused kernel on recent CUDA builds; the math is HF's (fp32, then cast).
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if weight_first:
        return (weight.float() * normed).to(x.dtype)
    return weight * normed.to(x.dtype)


def rms_norm_sharded(x: torch.Tensor, weight: torch.Tensor, eps: float, full_dim: int,
                     group=None, replication: int = 1) -> torch.Tensor:
    """RMSNorm over a feature dim that is split across the ranks of ``group``.

    OLMoE normalizes q and k over the whole projection (all heads), but under TP each rank holds
    only its heads. The mean of squares is a sum over ranks: one all-reduce of ``[T, 1]``.
    ``replication`` > 1 when every feature lives on that many ranks (kv heads replicated because
    there are fewer kv heads than TP ranks), so the all-reduced sum counts each one that often.

    Args: x ``[T, F_local]``; weight ``[F_local]`` (this rank's slice); ``full_dim`` = F.
    """
    x32 = x.float()
    sumsq = x32.pow(2).sum(-1, keepdim=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sumsq, group=group)
    var = sumsq / (full_dim * replication)
    return weight * (x32 * torch.rsqrt(var + eps)).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``[D/2]`` fp32 inverse frequencies of the default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / head_dim))


def rope_cos_sin(positions_T: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """``cos, sin``: ``[T, D]`` in ``dtype`` for absolute positions ``positions_T`` ``[T]``."""
    freqs = positions_T.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_TND: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate ``[T, N, D]`` queries or keys by their token's ``cos/sin`` ``[T, D]``."""
    cos, sin = cos_TD[:, None, :], sin_TD[:, None, :]
    return x_TND * cos + _rotate_half(x_TND) * sin
