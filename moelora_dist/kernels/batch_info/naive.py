"""PyTorch reference of the batch-info family, with the signature of ``ops.compute_batch_info``.

The reference proper lives in :mod:`moelora_dist.lora.batch_info` (the layer's CPU path uses
it); this wrapper only adds the ``num_tokens`` argument of the device version.
"""

from __future__ import annotations

import torch

from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.lora.batch_info import compute_batch_info as _reference


def compute_batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
                       slot_rank_S: torch.Tensor, validate: bool = True,
                       num_tokens: int | None = None) -> BatchInfo:
    """See :func:`moelora_dist.kernels.batch_info.ops.compute_batch_info`."""
    info = _reference(seg_indptr_B1, req_to_slot_B, slot_rank_S, validate=validate)
    if num_tokens is not None and num_tokens != info.num_tokens:
        raise ValueError(f"num_tokens={num_tokens} but seg_indptr ends at {info.num_tokens}")
    return info
