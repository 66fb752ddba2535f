"""Per-batch adapter info, computed once per batch and reused by every MoE layer.

Legend: B requests, T tokens, S slots. Requests are contiguous token segments:
request ``b`` owns tokens ``[seg_indptr[b], seg_indptr[b+1])`` and uses slot
``req_to_slot[b]`` (``-1``: base model only). This is the reference; the device kernel in
``moelora_dist.kernels.batch_info`` has the same signature and is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchInfo:
    """``token_slot_T``: ``[T]`` int32 slot per token, ``-1`` = no adapter.
    ``slot_enabled_S``: ``[S]`` bool, some request uses the slot and its rank is > 0.
    ``num_lora_tokens``: host int or None; 0 lets layers skip the LoRA path entirely.
    """

    token_slot_T: torch.Tensor
    slot_enabled_S: torch.Tensor
    num_lora_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_slot_T.shape[0])

    def any_lora(self) -> bool:
        if self.num_lora_tokens is not None:
            return self.num_lora_tokens > 0
        return bool(self.slot_enabled_S.any())


def _check_segments(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor, num_slots: int):
    if seg_indptr_B1.dim() != 1 or req_to_slot_B.dim() != 1:
        raise ValueError("seg_indptr and req_to_slot must be 1-D")
    if seg_indptr_B1.numel() != req_to_slot_B.numel() + 1:
        raise ValueError(
            f"seg_indptr has {seg_indptr_B1.numel()} entries but req_to_slot has "
            f"{req_to_slot_B.numel()}; seg_indptr needs one more entry than there are requests"
        )
    if seg_indptr_B1.numel() and int(seg_indptr_B1[0]) != 0:
        raise ValueError("seg_indptr must start at 0")
    if (seg_indptr_B1[1:] < seg_indptr_B1[:-1]).any():
        raise ValueError("seg_indptr must be non-decreasing (segments of length >= 0)")
    bad = (req_to_slot_B < -1) | (req_to_slot_B >= num_slots)
    if bad.any():
        raise ValueError(
            f"req_to_slot has values outside [-1, {num_slots}): {req_to_slot_B[bad].tolist()}"
        )


def compute_batch_info(seg_indptr_B1: torch.Tensor, req_to_slot_B: torch.Tensor,
                       slot_rank_S: torch.Tensor, validate: bool = True) -> BatchInfo:
    """Reference: expand per-request slots to per-token slots and mark the slots in use.

    Args:
        seg_indptr_B1: ``[B+1]`` int, token offsets of the requests.
        req_to_slot_B: ``[B]`` int, slot of each request, ``-1`` = base model.
        slot_rank_S: ``[S]`` int, rank of each slot's adapter (0: empty slot).
    """
    num_slots = int(slot_rank_S.numel())
    if validate:
        _check_segments(seg_indptr_B1, req_to_slot_B, num_slots)
    lengths_B = (seg_indptr_B1[1:] - seg_indptr_B1[:-1]).long()
    token_slot_T = torch.repeat_interleave(req_to_slot_B.long(), lengths_B).to(torch.int32)
    used_S = torch.zeros(num_slots, dtype=torch.bool, device=slot_rank_S.device)
    valid = (req_to_slot_B >= 0) & (lengths_B > 0)
    used_S[req_to_slot_B[valid].long()] = True
    slot_enabled_S = used_S & (slot_rank_S > 0)
    enabled_tokens = (token_slot_T >= 0) & slot_enabled_S[token_slot_T.clamp(min=0).long()]
    token_slot_T = torch.where(enabled_tokens, token_slot_T, torch.full_like(token_slot_T, -1))
    return BatchInfo(token_slot_T, slot_enabled_S, int(enabled_tokens.sum()))
