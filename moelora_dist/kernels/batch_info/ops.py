"""Host glue of the batch-info family: one launch per batch, no host sync; the signature and
outputs of :func:`.naive.batch_info`."""

from __future__ import annotations

import torch

from moelora_dist.kernels.batch_info.kernel import _batch_info_kernel


def batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
               slot_rank_S: torch.Tensor, num_tokens: int | None = None):
    """See :func:`moelora_dist.kernels.batch_info.naive.batch_info`. ``num_tokens`` (``T``)
    is read from ``seg_indptr_B1[-1]`` (a host sync) when not given."""
    num_slots = int(slot_rank_S.numel())
    if num_tokens is None:
        num_tokens = int(seg_indptr_B1[-1]) if seg_indptr_B1.numel() else 0
    dev = seg_indptr_B1.device
    token_slot_T = torch.empty(num_tokens, dtype=torch.int32, device=dev)
    slot_enabled_S = torch.empty(num_slots, dtype=torch.bool, device=dev)
    count = torch.empty(1, dtype=torch.int32, device=dev)
    _batch_info_kernel[(1,)](
        seg_indptr_B1.to(torch.int32), req_to_slot_B.to(torch.int32),
        slot_rank_S.to(torch.int32), token_slot_T, slot_enabled_S, count,
        int(req_to_slot_B.numel()), num_slots, BLOCK_T=256, BLOCK_S=64)
    return token_slot_T, slot_enabled_S, count
