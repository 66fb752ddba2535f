"""Host glue of the fused residual-add + RMSNorm: one launch instead of the add, the casts,
the norm and the scale (five launches in eager PyTorch). No host sync; CUDA-graph safe."""

from __future__ import annotations

import torch

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.norm.kernel import _add_rms_norm_kernel


def add_rms_norm(h_TH: torch.Tensor, delta_TH: torch.Tensor | None, weight_H: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """See :func:`moelora_dist.kernels.norm.naive.add_rms_norm` (rows with unit stride)."""
    T, H = h_TH.shape
    out = torch.empty_like(h_TH)
    if T == 0:
        return out
    if h_TH.stride(1) != 1 or (delta_TH is not None and delta_TH.stride(1) != 1):
        raise ValueError("add_rms_norm needs rows with unit stride")
    d = delta_TH if delta_TH is not None else h_TH
    _add_rms_norm_kernel[(T,)](h_TH, d, weight_H, out, H, eps, h_TH.stride(0), d.stride(0),
                               out.stride(0), HAS_DELTA=delta_TH is not None,
                               BLOCK_H=next_power_of_2(H))
    return out
