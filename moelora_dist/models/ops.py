"""The RMSNorm over a feature dim split across TP ranks (OLMoE's q/k norm), written to match
transformers 5 bit for bit in fp32 (same op order, same casts). The other norms of the decoder
are the fused residual-add + RMSNorm family (:mod:`moelora_dist.kernels.norm`), the rotary
embedding is fused into the paged-attention write (:mod:`moelora_dist.kernels.paged_attention`).

Legend: T tokens, F features.
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
