"""Triton kernels of the align family (imports triton only; host glue is in ``ops.py``).

An *item* is a (token, k) pair (``item < num_pairs``) or, in the LoRA shrink pass, a whole
token (``item >= num_pairs``; used for slots whose A is shared by all experts, so their shrink
is computed once per token). Every item gets a *bucket* (the unit of padding: all rows of a
block share it) and a *sub key* (orders items inside a bucket, so that e.g. the rows of one
adapter slot sit next to each other inside an expert's blocks). Invalid items go to the
sentinel bucket ``num_buckets``; their blocks are marked ``-1`` and never computed. A
negative id is never shifted into a valid range: validity is decided before any arithmetic.
"""

import triton
import triton.language as tl

# Modes of the key function (constexpr).
MODE_BASE = 0  # bucket = expert; sub = effective slot + 1 when SUB_SLOT, else 0
MODE_LORA = 1  # bucket = slot * E + expert (pairs of per-expert-A slots), slot * E (tokens)
MODE_LORA_PAIRS = 2  # bucket = slot * E + expert for every pair with an enabled slot


@triton.jit
def _effective_slot(tok, mask, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr):
    """Slot of each token if it is >= 0, enabled and of rank > 0, else -1 (never an index)."""
    slot = tl.load(token_slot_ptr + tok, mask=mask, other=-1)
    ok = mask & (slot >= 0)
    en = tl.load(slot_enabled_ptr + slot, mask=ok, other=0)
    rk = tl.load(slot_rank_ptr + slot, mask=ok, other=0)
    return tl.where(ok & (en != 0) & (rk > 0), slot, -1)


@triton.jit
def _item_keys(item, in_range, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
               shared_ptr, num_pairs, top_k, num_experts, num_buckets,
               MODE: tl.constexpr, SUB_SLOT: tl.constexpr):
    """(bucket, sub) of each item; bucket == num_buckets for invalid items."""
    is_pair = in_range & (item < num_pairs)
    tok = tl.where(is_pair, item // top_k, item - num_pairs)
    expert = tl.load(topk_ids_ptr + item, mask=is_pair, other=-1)
    if MODE == 0:
        valid = is_pair & (expert >= 0) & (expert < num_experts)
        bucket = tl.where(valid, expert, num_buckets)
        if SUB_SLOT:
            slot = _effective_slot(tok, valid, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr)
            sub = slot + 1
        else:
            sub = tl.zeros_like(bucket)
    else:
        slot = _effective_slot(tok, in_range, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr)
        has = slot >= 0
        if MODE == 1:
            shared = tl.load(shared_ptr + slot, mask=has, other=0) != 0
            pair_ok = is_pair & has & (~shared) & (expert >= 0) & (expert < num_experts)
            tok_ok = in_range & (item >= num_pairs) & has & shared
            bucket = tl.where(pair_ok, slot * num_experts + expert,
                              tl.where(tok_ok, slot * num_experts, num_buckets))
        else:
            pair_ok = is_pair & has & (expert >= 0) & (expert < num_experts)
            bucket = tl.where(pair_ok, slot * num_experts + expert, num_buckets)
        sub = tl.zeros_like(bucket)
    return bucket, sub


@triton.jit
def _align_count_kernel(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                        shared_ptr, counts_ptr, num_items, num_pairs, top_k, num_experts,
                        num_buckets, num_sub,
                        MODE: tl.constexpr, SUB_SLOT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    item = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = item < num_items
    bucket, sub = _item_keys(item, in_range, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                             slot_rank_ptr, shared_ptr, num_pairs, top_k, num_experts,
                             num_buckets, MODE, SUB_SLOT)
    # Relaxed: the only ordering needed is the kernel boundary before the scan.
    tl.atomic_add(counts_ptr + bucket * num_sub + sub, 1, mask=in_range, sem="relaxed")


@triton.jit
def _align_scan_kernel(counts_ptr, bucket_end_ptr, num_post_pad_ptr, num_buckets, num_sub,
                       BLOCK_M: tl.constexpr, NB_P2: tl.constexpr, NS_P2: tl.constexpr):
    """One program: padded bucket offsets, and the start of every (bucket, sub) run.

    ``counts`` holds ``(num_buckets + 1) * num_sub`` counters (the last bucket is the
    sentinel); they are overwritten in place with the start offsets used by the scatter.
    """
    b = tl.arange(0, NB_P2)
    s = tl.arange(0, NS_P2)
    live = (b[:, None] <= num_buckets) & (s[None, :] < num_sub)
    offs = b[:, None] * num_sub + s[None, :]
    cnt = tl.load(counts_ptr + offs, mask=live, other=0)
    per_bucket = tl.sum(cnt, axis=1)
    padded = (per_bucket + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    sub_start = tl.cumsum(cnt, axis=1) - cnt
    tl.store(counts_ptr + offs, start[:, None] + sub_start, mask=live)
    tl.store(bucket_end_ptr + b, end, mask=b <= num_buckets)
    tl.store(num_post_pad_ptr, tl.sum(padded, axis=0))


@triton.jit
def _align_scatter_kernel(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                          shared_ptr, cursor_ptr, sorted_ids_ptr, num_items, num_pairs, top_k,
                          num_experts, num_buckets, num_sub,
                          MODE: tl.constexpr, SUB_SLOT: tl.constexpr, BLOCK: tl.constexpr):
    """Place each item at its run's cursor (the order inside a run is arbitrary)."""
    pid = tl.program_id(0).to(tl.int64)
    item = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = item < num_items
    bucket, sub = _item_keys(item, in_range, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                             slot_rank_ptr, shared_ptr, num_pairs, top_k, num_experts,
                             num_buckets, MODE, SUB_SLOT)
    pos = tl.atomic_add(cursor_ptr + bucket * num_sub + sub, 1, mask=in_range, sem="relaxed")
    tl.store(sorted_ids_ptr + pos, item.to(tl.int32), mask=in_range)


@triton.jit
def _align_label_kernel(bucket_end_ptr, block_bucket_ptr, num_buckets, max_blocks,
                        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program per bucket (the last is the sentinel, and also clears the tail): write the
    bucket's id on its blocks; sentinel blocks and blocks past the end get -1."""
    b = tl.program_id(0)
    end = tl.load(bucket_end_ptr + b) // BLOCK_M
    start = tl.load(bucket_end_ptr + b - 1, mask=b > 0, other=0) // BLOCK_M
    is_sentinel = b == num_buckets
    label = tl.where(is_sentinel, -1, b)
    stop = tl.where(is_sentinel, max_blocks, end)
    for j0 in range(start, stop, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        tl.store(block_bucket_ptr + j, tl.zeros([BLOCK_B], dtype=tl.int32) + label,
                 mask=j < stop)
