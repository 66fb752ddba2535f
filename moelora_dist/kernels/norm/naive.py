"""Reference of the fused residual-add + RMSNorm (also the CPU path); same signature as
``ops.py``. Legend: T tokens, H hidden.

The numerics are transformers' decoder layer, op for op: the residual sum is rounded to the
model dtype, normalized in fp32, cast back, then scaled by the weight in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(h_TH: torch.Tensor, delta_TH: torch.Tensor | None, weight_H: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``h += delta`` in place (skipped when ``delta`` is None), then return ``norm(h)``.

    Args: h_TH ``[T, H]`` the residual stream (updated in place); delta_TH ``[T, H]`` the
    sublayer output or None; weight_H ``[H]``. Returns ``[T, H]`` in h's dtype.
    """
    if delta_TH is not None:
        h_TH.add_(delta_TH)
    return weight_H * F.rms_norm(h_TH.float(), (h_TH.shape[-1],), eps=eps).to(h_TH.dtype)
