"""Reference of the batch-info family (also the CPU path); same signature as ``ops.py``.

Legend: B requests, T tokens, S slots. Requests are contiguous token segments: request ``b``
owns tokens ``[seg_indptr[b], seg_indptr[b+1])`` and uses slot ``req_to_slot[b]`` (``-1``:
base model only).
"""

from __future__ import annotations

import torch


def check_segments(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
                   num_slots: int) -> None:
    """``ValueError`` naming the problem when the segments or slots are malformed (syncs)."""
    if seg_indptr_B1.dim() != 1 or req_to_slot_B.dim() != 1:
        raise ValueError("seg_indptr and req_to_slot must be 1-D")
    if seg_indptr_B1.numel() != req_to_slot_B.numel() + 1:
        raise ValueError(
            f"seg_indptr has {seg_indptr_B1.numel()} entries but req_to_slot has "
            f"{req_to_slot_B.numel()}; seg_indptr needs one more entry than there are requests")
    if seg_indptr_B1.numel() and int(seg_indptr_B1[0]) != 0:
        raise ValueError("seg_indptr must start at 0")
    if (seg_indptr_B1[1:] < seg_indptr_B1[:-1]).any():
        raise ValueError("seg_indptr must be non-decreasing (segments of length >= 0)")
    bad = (req_to_slot_B < -1) | (req_to_slot_B >= num_slots)
    if bad.any():
        raise ValueError(
            f"req_to_slot has values outside [-1, {num_slots}): {req_to_slot_B[bad].tolist()}")


def batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
               slot_rank_S: torch.Tensor, num_tokens: int | None = None):
    """Expand per-request slots to per-token slots and mark the slots in use.

    Args:
        seg_indptr_B1: ``[B+1]`` int token offsets of the requests.
        req_to_slot_B: ``[B]`` int slot of each request, ``-1`` = base model.
        slot_rank_S: ``[S]`` int rank of each slot's adapter (0: empty slot).
        num_tokens: ``T`` when known (checked against ``seg_indptr_B1[-1]``).
    Returns:
        ``token_slot_T`` ``[T]`` int32 (``-1``: no adapter, also for a slot of rank 0),
        ``slot_enabled_S`` ``[S]`` bool (some request of length > 0 uses it, rank > 0),
        ``num_lora_tokens`` ``[1]`` int32 (tokens with an enabled slot).
    """
    num_slots = int(slot_rank_S.numel())
    lengths_B = (seg_indptr_B1[1:] - seg_indptr_B1[:-1]).long()
    token_slot_T = torch.repeat_interleave(req_to_slot_B.long(), lengths_B).to(torch.int32)
    if num_tokens is not None and num_tokens != token_slot_T.numel():
        raise ValueError(f"num_tokens={num_tokens} but seg_indptr ends at {token_slot_T.numel()}")
    used_S = torch.zeros(num_slots, dtype=torch.bool, device=slot_rank_S.device)
    valid = (req_to_slot_B >= 0) & (lengths_B > 0)
    used_S[req_to_slot_B[valid].long()] = True
    slot_enabled_S = used_S & (slot_rank_S > 0)
    enabled_T = (token_slot_T >= 0) & slot_enabled_S[token_slot_T.clamp(min=0).long()]
    token_slot_T = torch.where(enabled_T, token_slot_T, torch.full_like(token_slot_T, -1))
    return token_slot_T, slot_enabled_S, enabled_T.sum().to(torch.int32).reshape(1)
