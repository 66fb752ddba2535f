"""PyTorch reference of the align family: same signature and outputs as ``ops.align_items``.

Items are placed in a stable order (by item id inside each (bucket, sub) run); the Triton
kernel places them with atomics, so only the order inside a run may differ.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.align.common import Alignment, max_rows
from moelora_dist.kernels.constants import ALIGN_MODES


def item_keys(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S, *,
              num_experts: int, mode: str, sort_by_slot: bool):
    """``(bucket, sub)`` of every item as int64 tensors; invalid items get bucket ``nb``."""
    T, K = topk_ids_TK.shape
    S = int(slot_rank_S.numel()) if slot_rank_S is not None else 0
    nb = num_experts if mode == "base" else S * num_experts
    expert = topk_ids_TK.reshape(-1).long()
    tok = torch.arange(T * K, device=expert.device) // K
    ok_e = (expert >= 0) & (expert < num_experts)

    def eff_slot(t):
        slot = token_slot_T.long()[t]
        safe = slot.clamp(min=0)  # only read where slot >= 0 (S > 0 is checked by callers)
        good = (slot >= 0) & slot_enabled_S.bool()[safe] & (slot_rank_S[safe] > 0)
        return torch.where(good, slot, torch.full_like(slot, -1))

    if mode == "base":
        bucket = torch.where(ok_e, expert, torch.full_like(expert, nb))
        sub = eff_slot(tok) + 1 if sort_by_slot else torch.zeros_like(bucket)
        sub = torch.where(ok_e, sub, torch.zeros_like(sub))
        return bucket, sub
    slot = eff_slot(tok)
    if mode == "lora_pairs":
        good = ok_e & (slot >= 0)
        bucket = torch.where(good, slot * num_experts + expert, torch.full_like(expert, nb))
        return bucket, torch.zeros_like(bucket)
    shared = shared_S.bool()[slot.clamp(min=0)] & (slot >= 0)
    pair_ok = ok_e & (slot >= 0) & ~shared
    pair_bucket = torch.where(pair_ok, slot * num_experts + expert, torch.full_like(expert, nb))
    tslot = eff_slot(torch.arange(T, device=expert.device))
    tshared = shared_S.bool()[tslot.clamp(min=0)] & (tslot >= 0)
    tok_bucket = torch.where(tshared, tslot * num_experts, torch.full_like(tslot, nb))
    bucket = torch.cat([pair_bucket, tok_bucket])
    return bucket, torch.zeros_like(bucket)


def align_items(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S, *,
                num_experts: int, block_m: int, mode: str = "base",
                sort_by_slot: bool = False) -> Alignment:
    """Reference of :func:`moelora_dist.kernels.align.ops.align_items` (see it for shapes)."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown align mode {mode!r}; expected one of {sorted(ALIGN_MODES)}")
    bucket, sub = item_keys(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S,
                            num_experts=num_experts, mode=mode, sort_by_slot=sort_by_slot)
    S = int(slot_rank_S.numel()) if slot_rank_S is not None else 0
    nb = num_experts if mode == "base" else S * num_experts
    num_items = int(bucket.numel())
    rows = max_rows(num_items, nb, block_m)
    dev = topk_ids_TK.device
    sorted_ids = torch.full((rows,), num_items, dtype=torch.int32, device=dev)
    block_bucket = torch.full((rows // block_m,), -1, dtype=torch.int32, device=dev)
    pos = 0
    for b in range(nb + 1):
        in_b = (bucket == b).nonzero().flatten()
        if in_b.numel() == 0:
            continue
        order = in_b[torch.argsort(sub[in_b], stable=True)]
        sorted_ids[pos:pos + order.numel()] = order.to(torch.int32)
        padded = -(-order.numel() // block_m) * block_m
        block_bucket[pos // block_m:(pos + padded) // block_m] = b if b < nb else -1
        pos += padded
    return Alignment(sorted_ids, block_bucket, torch.tensor([pos], dtype=torch.int32, device=dev),
                     block_m, num_items)
