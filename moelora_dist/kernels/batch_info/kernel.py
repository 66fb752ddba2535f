"""Triton kernel of the batch-info family (imports triton only; host glue in ``ops.py``)."""

import triton
import triton.language as tl


@triton.jit
def _batch_info_kernel(seg_indptr_ptr, req_to_slot_ptr, slot_rank_ptr, token_slot_ptr,
                       slot_enabled_ptr, num_lora_tokens_ptr, num_reqs, num_slots,
                       BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program for the whole batch, so clearing ``slot_enabled`` is ordered before the
    marks (no second launch, no memset). A ``-1`` request is never used as an index: its
    slot and rank loads are masked off."""
    for s0 in range(0, num_slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        tl.store(slot_enabled_ptr + s, tl.zeros([BLOCK_S], dtype=tl.int1), mask=s < num_slots)
    tl.debug_barrier()
    num_lora = 0
    for b in range(0, num_reqs):
        start = tl.load(seg_indptr_ptr + b)
        end = tl.load(seg_indptr_ptr + b + 1)
        slot = tl.load(req_to_slot_ptr + b)
        valid = (slot >= 0) & (slot < num_slots)
        rank = tl.load(slot_rank_ptr + slot, mask=valid, other=0)
        used = valid & (rank > 0) & (end > start)
        tl.store(slot_enabled_ptr + slot, used, mask=used)
        out = tl.where(used, slot, -1)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tl.store(token_slot_ptr + t, tl.zeros([BLOCK_T], dtype=tl.int32) + out, mask=t < end)
        num_lora += tl.where(used, end - start, 0)
    tl.store(num_lora_tokens_ptr, num_lora)
