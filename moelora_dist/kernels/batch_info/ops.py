"""Host glue of the batch-info family: one launch per batch, no host sync.

Same signature as the reference :func:`moelora_dist.lora.batch_info.compute_batch_info`.
``validate=True`` checks the segments on the host (it syncs); the serving loop passes
``validate=False`` once its inputs are known good, and then nothing here waits for the GPU.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.batch_info.kernel import _batch_info_kernel
from moelora_dist.lora.batch_info import BatchInfo, _check_segments


def compute_batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
                       slot_rank_S: torch.Tensor, validate: bool = True,
                       num_tokens: int | None = None) -> BatchInfo:
    """Per-token slot and per-slot enabled flags on the device.

    Args:
        seg_indptr_B1: ``[B+1]`` int32/int64 token offsets of the requests.
        req_to_slot_B: ``[B]`` int32/int64 slot per request, ``-1`` = base model.
        slot_rank_S: ``[S]`` int32 rank of each slot (0: empty).
        num_tokens: ``T``; read from ``seg_indptr_B1[-1]`` (a sync) when not given.
    Returns:
        :class:`BatchInfo` with ``token_slot_T`` ``[T]`` int32 (``-1``: no adapter, also for
        a slot of rank 0), ``slot_enabled_S`` ``[S]`` bool, and ``num_lora_tokens`` as a
        host int when ``validate`` (which syncs anyway), else ``None``; the device count is
        kept in ``num_lora_tokens_dev`` (``[1]`` int32) for callers that want it later.
    """
    num_slots = int(slot_rank_S.numel())
    if validate:
        _check_segments(seg_indptr_B1, req_to_slot_B, num_slots)
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
    info = BatchInfo(token_slot_T, slot_enabled_S, int(count) if validate else None)
    info.num_lora_tokens_dev = count
    return info
