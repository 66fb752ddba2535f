"""Host glue of the fused residual-add + RMSNorm: one launch instead of the add, the casts,
the norm and the scale (five launches in eager PyTorch). No host sync; CUDA-graph safe."""

from __future__ import annotations

import torch

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.norm.kernel import (_add_rms_norm_kernel, _add_rms_norm_lora_kernel,
                                             _add_topk_rms_norm_kernel)

LORA_BLOCK_C = 512  # columns per step of the fused-expand norm (a 512 x R tile of b)


def add_rms_norm(h_TH: torch.Tensor, delta_TH: torch.Tensor | None, weight_H: torch.Tensor,
                 eps: float, lora=None) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.norm.naive.add_rms_norm` (rows with unit stride).

    ``lora``: a :class:`~moelora_dist.kernels.dense_lora.ops.TokenLoRA` of one module whose
    output ``delta_TH`` is before its LoRA delta: the expand is fused here (one launch for
    the expand, the residual add and the norm; :data:`LORA_BLOCK_C` columns at a time)."""
    T, H = h_TH.shape
    out = torch.empty_like(h_TH)
    if T == 0:
        return out
    if h_TH.stride(1) != 1 or (delta_TH is not None and delta_TH.stride(1) != 1):
        raise ValueError("add_rms_norm needs rows with unit stride")
    if lora is not None:
        if delta_TH is None or len(lora.b_list) != 1:
            raise ValueError("a fused LoRA expand needs the module's output and one module")
        b = lora.b_list[0]
        _add_rms_norm_lora_kernel[(T,)](
            h_TH, delta_TH, weight_H, out, H, eps, h_TH.stride(0), delta_TH.stride(0),
            out.stride(0), *lora.shrink_args(), b, *b.stride(),
            BLOCK_C=min(LORA_BLOCK_C, next_power_of_2(H)), BLOCK_R=lora.block_r, num_warps=8)
        return out
    d = delta_TH if delta_TH is not None else h_TH
    _add_rms_norm_kernel[(T,)](h_TH, d, weight_H, out, H, eps, h_TH.stride(0), d.stride(0),
                               out.stride(0), HAS_DELTA=delta_TH is not None,
                               BLOCK_H=next_power_of_2(H))
    return out


def add_topk_rms_norm(h_TH: torch.Tensor, pairs, weight_H: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """:func:`add_rms_norm` with ``delta = pairs.sum()`` (``pairs``: a
    :class:`~moelora_dist.kernels.moe_gemm.ops.PairOutputs`, the weighted expert outputs of a
    one-GPU MoE layer before their top-k sum, and the shared experts' output to add, if any),
    the sum done in the same launch: the same bits as ``pairs.sum()`` then
    :func:`add_rms_norm`, one launch (two with shared experts) less."""
    T, H = h_TH.shape
    out_NH, ids = pairs.out_NH, pairs.topk_ids_TK.contiguous()
    K = ids.shape[1]
    if tuple(out_NH.shape) != (T * K, H) or tuple(ids.shape) != (T, K):
        raise ValueError(f"pair outputs {tuple(out_NH.shape)} and top-k ids {tuple(ids.shape)} "
                         f"do not match h [{T}, {H}]")
    out = torch.empty_like(h_TH)
    if T == 0:
        return out
    plus = pairs.plus_TH
    if plus is not None and (tuple(plus.shape) != (T, H) or plus.dtype != out_NH.dtype):
        raise ValueError(f"the added output {tuple(plus.shape)} {plus.dtype} does not match "
                         f"[{T}, {H}] {out_NH.dtype}")
    if h_TH.stride(1) != 1 or out_NH.stride(1) != 1 or (plus is not None
                                                        and plus.stride(1) != 1):
        raise ValueError("add_topk_rms_norm needs rows with unit stride")
    p = plus if plus is not None else out_NH  # never read without HAS_PLUS
    _add_topk_rms_norm_kernel[(T,)](h_TH, out_NH, ids, p, weight_H, out, H, K,
                                    pairs.num_experts, eps, h_TH.stride(0), out_NH.stride(0),
                                    p.stride(0), out.stride(0), HAS_PLUS=plus is not None,
                                    BLOCK_H=next_power_of_2(H))
    return out
