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

from moelora_dist.kernels import constants

# Modes of the key function (constexpr; numbers and meaning in ``kernels/constants.py``).
MODE_BASE = tl.constexpr(constants.ALIGN_MODE_BASE)
MODE_LORA = tl.constexpr(constants.ALIGN_MODE_LORA)


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
    if MODE == MODE_BASE:
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
        if MODE == MODE_LORA:
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
def _count_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, shared_ptr,
               counts_ptr, sorted_ids_ptr, labels_ptr, num_items, num_rows, num_blocks,
               num_pairs, top_k, num_experts, num_buckets, num_sub,
               MODE: tl.constexpr, SUB_SLOT: tl.constexpr):
    # Padding rows hold num_items (never a valid item) and every block starts unlabelled (-1);
    # the scatter overwrites both where items land (it runs after this kernel).
    tl.store(sorted_ids_ptr + item, (tl.zeros_like(item) + num_items).to(tl.int32),
             mask=item < num_rows)
    tl.store(labels_ptr + item, tl.zeros_like(item).to(tl.int32) - 1, mask=item < num_blocks)
    in_range = item < num_items
    bucket, sub = _item_keys(item, in_range, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                             slot_rank_ptr, shared_ptr, num_pairs, top_k, num_experts,
                             num_buckets, MODE, SUB_SLOT)
    # Relaxed: the only ordering needed is the kernel boundary before the scan.
    tl.atomic_add(counts_ptr + bucket * num_sub + sub, 1, mask=in_range, sem="relaxed")


@triton.jit
def _align_count_kernel(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                        shared_ptr, counts_a_ptr, ids_a_ptr, labels_a_ptr, counts_b_ptr,
                        ids_b_ptr, labels_b_ptr, num_items_a, rows_a, blocks_a, buckets_a,
                        sub_a, num_items_b, rows_b, blocks_b, buckets_b,
                        num_pairs, top_k, num_experts,
                        MODE_A: tl.constexpr, SUB_SLOT_A: tl.constexpr, MODE_B: tl.constexpr,
                        TWO: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of (bucket, sub) keys, and the fill of the outputs, for alignment A and (when
    ``TWO``) alignment B of the same items: one launch instead of a fill and a count each."""
    item = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _count_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, shared_ptr,
               counts_a_ptr, ids_a_ptr, labels_a_ptr, num_items_a, rows_a, blocks_a,
               num_pairs, top_k, num_experts, buckets_a, sub_a, MODE_A, SUB_SLOT_A)
    if TWO:
        _count_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                   shared_ptr, counts_b_ptr, ids_b_ptr, labels_b_ptr, num_items_b, rows_b,
                   blocks_b, num_pairs, top_k, num_experts, buckets_b, 1, MODE_B, False)


@triton.jit
def _scan_one(counts_ptr, num_post_pad_ptr, num_buckets, num_sub,
              BLOCK_M: tl.constexpr, NB_P2: tl.constexpr, NS_P2: tl.constexpr,
              ATOMIC: tl.constexpr = False):
    """Padded bucket offsets and the start of every (bucket, sub) run, in place.

    ``counts`` holds ``(num_buckets + 1) * num_sub`` counters (the last bucket is the
    sentinel); they are overwritten with the start offsets used by the scatter. ``ATOMIC``:
    the counters are read and written by atomics (the single-launch kernel, where the
    histogram's atomics ran in the same launch: every access to them then goes to L2).
    """
    b = tl.arange(0, NB_P2)
    s = tl.arange(0, NS_P2)
    live = (b[:, None] <= num_buckets) & (s[None, :] < num_sub)
    offs = b[:, None] * num_sub + s[None, :]
    if ATOMIC:
        cnt = tl.atomic_add(counts_ptr + offs, tl.zeros_like(offs).to(tl.int32), mask=live,
                            sem="relaxed")
        cnt = tl.where(live, cnt, 0)
    else:
        cnt = tl.load(counts_ptr + offs, mask=live, other=0)
    per_bucket = tl.sum(cnt, axis=1)
    padded = (per_bucket + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    sub_start = tl.cumsum(cnt, axis=1) - cnt
    if ATOMIC:
        tl.atomic_xchg(counts_ptr + offs, (start[:, None] + sub_start).to(tl.int32), mask=live,
                       sem="relaxed")
    else:
        tl.store(counts_ptr + offs, start[:, None] + sub_start, mask=live)
    tl.store(num_post_pad_ptr, tl.sum(padded, axis=0))


@triton.jit
def _align_scan_kernel(counts_a_ptr, npp_a_ptr, buckets_a, sub_a, counts_b_ptr, npp_b_ptr,
                       buckets_b, BM_A: tl.constexpr, NB_A_P2: tl.constexpr,
                       NS_A_P2: tl.constexpr, BM_B: tl.constexpr, NB_B_P2: tl.constexpr):
    """Program 0 scans alignment A, program 1 (launched only for two) alignment B."""
    if tl.program_id(0) == 0:
        _scan_one(counts_a_ptr, npp_a_ptr, buckets_a, sub_a, BM_A, NB_A_P2, NS_A_P2)
    else:
        _scan_one(counts_b_ptr, npp_b_ptr, buckets_b, 1, BM_B, NB_B_P2, 1)


@triton.jit
def _scatter_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                 shared_ptr, cursor_ptr, sorted_ids_ptr, labels_ptr, num_items, num_pairs,
                 top_k, num_experts, num_buckets, num_sub,
                 MODE: tl.constexpr, SUB_SLOT: tl.constexpr, BLOCK_M: tl.constexpr):
    in_range = item < num_items
    bucket, sub = _item_keys(item, in_range, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                             slot_rank_ptr, shared_ptr, num_pairs, top_k, num_experts,
                             num_buckets, MODE, SUB_SLOT)
    pos = tl.atomic_add(cursor_ptr + bucket * num_sub + sub, 1, mask=in_range, sem="relaxed")
    tl.store(sorted_ids_ptr + pos, item.to(tl.int32), mask=in_range)
    # Every block of a bucket holds at least one item (padding < BLOCK_M sits at the end), so
    # the items label all blocks; items of one block all write the same label.
    label = tl.where(bucket == num_buckets, -1, bucket).to(tl.int32)
    tl.store(labels_ptr + pos // BLOCK_M, label, mask=in_range)


@triton.jit
def _align_scatter_kernel(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                          shared_ptr, cursor_a_ptr, ids_a_ptr, labels_a_ptr, cursor_b_ptr,
                          ids_b_ptr, labels_b_ptr, num_items_a, buckets_a, sub_a,
                          num_items_b, buckets_b, num_pairs, top_k, num_experts,
                          MODE_A: tl.constexpr, SUB_SLOT_A: tl.constexpr, BM_A: tl.constexpr,
                          MODE_B: tl.constexpr, BM_B: tl.constexpr, TWO: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Place each item at its run's cursor (the order inside a run is arbitrary) and label
    the block it lands in, for A and (when ``TWO``) B."""
    item = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _scatter_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                 shared_ptr, cursor_a_ptr, ids_a_ptr, labels_a_ptr, num_items_a, num_pairs,
                 top_k, num_experts, buckets_a, sub_a, MODE_A, SUB_SLOT_A, BM_A)
    if TWO:
        _scatter_one(item, topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                     shared_ptr, cursor_b_ptr, ids_b_ptr, labels_b_ptr, num_items_b,
                     num_pairs, top_k, num_experts, buckets_b, 1, MODE_B, False, BM_B)


@triton.jit
def _align_in_block(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr, shared_ptr,
                    counts_ptr, ids_ptr, labels_ptr, npp_ptr, num_items, rows, blocks,
                    buckets, sub, num_pairs, top_k, num_experts, MODE: tl.constexpr,
                    SUB_SLOT: tl.constexpr, BM: tl.constexpr, NB_P2: tl.constexpr,
                    NS_P2: tl.constexpr, BLOCK: tl.constexpr):
    """One alignment's four phases in this thread block: zero the counters, fill the outputs
    (padding rows, unlabelled blocks), count, scan, scatter. Phases are separated by block
    barriers; every access to the counters is an atomic (done in L2), so a phase sees the
    previous phase's counts whatever the L1 holds."""
    offs = tl.arange(0, BLOCK)
    num_counts = (buckets + 1) * sub
    for c0 in range(0, num_counts, BLOCK):
        tl.atomic_xchg(counts_ptr + c0 + offs, tl.zeros_like(offs).to(tl.int32),
                       mask=c0 + offs < num_counts, sem="relaxed")
    for r0 in range(0, rows, BLOCK):
        r = r0 + offs
        tl.store(ids_ptr + r, (tl.zeros_like(r) + num_items).to(tl.int32), mask=r < rows)
        tl.store(labels_ptr + r, tl.zeros_like(r).to(tl.int32) - 1, mask=r < blocks)
    tl.debug_barrier()
    for i0 in range(0, num_items, BLOCK):  # count only: no fill (rows and blocks 0)
        _count_one(i0 + offs.to(tl.int64), topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                   slot_rank_ptr, shared_ptr, counts_ptr, ids_ptr, labels_ptr, num_items, 0, 0,
                   num_pairs, top_k, num_experts, buckets, sub, MODE, SUB_SLOT)
    tl.debug_barrier()
    _scan_one(counts_ptr, npp_ptr, buckets, sub, BM, NB_P2, NS_P2, True)
    tl.debug_barrier()
    for i0 in range(0, num_items, BLOCK):
        _scatter_one(i0 + offs.to(tl.int64), topk_ids_ptr, token_slot_ptr, slot_enabled_ptr,
                     slot_rank_ptr, shared_ptr, counts_ptr, ids_ptr, labels_ptr, num_items,
                     num_pairs, top_k, num_experts, buckets, sub, MODE, SUB_SLOT, BM)


@triton.jit
def _align_single_kernel(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                         shared_ptr, counts_a_ptr, ids_a_ptr, labels_a_ptr, npp_a_ptr,
                         counts_b_ptr, ids_b_ptr, labels_b_ptr, npp_b_ptr,
                         num_items_a, rows_a, blocks_a, buckets_a, sub_a,
                         num_items_b, rows_b, blocks_b, buckets_b, num_pairs, top_k,
                         num_experts,
                         MODE_A: tl.constexpr, SUB_SLOT_A: tl.constexpr, BM_A: tl.constexpr,
                         NB_A_P2: tl.constexpr, NS_A_P2: tl.constexpr, MODE_B: tl.constexpr,
                         BM_B: tl.constexpr, NB_B_P2: tl.constexpr, BLOCK: tl.constexpr):
    """The four launches of an alignment (zero, count, scan, scatter) in one, for batches
    small enough that one thread block does them faster than four launches start (decode
    steps): program 0 aligns A, program 1 (launched for a pair) B; their counters and outputs
    are disjoint, so the two blocks never wait on each other."""
    if tl.program_id(0) == 0:
        _align_in_block(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                        shared_ptr, counts_a_ptr, ids_a_ptr, labels_a_ptr, npp_a_ptr,
                        num_items_a, rows_a, blocks_a, buckets_a, sub_a, num_pairs, top_k,
                        num_experts, MODE_A, SUB_SLOT_A, BM_A, NB_A_P2, NS_A_P2, BLOCK)
    else:
        _align_in_block(topk_ids_ptr, token_slot_ptr, slot_enabled_ptr, slot_rank_ptr,
                        shared_ptr, counts_b_ptr, ids_b_ptr, labels_b_ptr, npp_b_ptr,
                        num_items_b, rows_b, blocks_b, buckets_b, 1, num_pairs, top_k,
                        num_experts, MODE_B, False, BM_B, NB_B_P2, 1, BLOCK)
