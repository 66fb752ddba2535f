"""Host glue of the align family: sizes, allocation and launches (no host sync).

Pipeline (6 launches, static shapes, CUDA-graph safe for a fixed ``T``):
``zeros(counts)`` -> ``_align_count_kernel`` (atomic histogram of (bucket, sub) keys) ->
``_align_scan_kernel`` (one program: padded bucket offsets, run starts) ->
``full(sorted_ids, pad)`` + ``_align_scatter_kernel`` (items to their places) ->
``_align_label_kernel`` (one program per bucket labels its blocks).

Measured on an H100 (docs/kernels.md): an earlier version labelled the blocks inside the
scatter by counting bucket ends per block (O(blocks x buckets)) with acq_rel atomics; it took
45-600 us, as long as the whole base layer at T=1. Per-bucket labelling and relaxed atomics
fixed that.

Every output is sized for the worst case of ``num_items`` items, so its shape depends only on
``T``, ``K``, the bucket count and ``BLOCK_M``: at most ``min(num_buckets + 1, num_items)``
buckets are non-empty and each adds at most ``BLOCK_M - 1`` rows of padding. The grids of the
GEMMs are therefore bounded by the work that exists (items), never by ``S x E``.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.align.common import MODES, Alignment, max_rows
from moelora_dist.kernels.align.kernel import (
    _align_count_kernel, _align_label_kernel, _align_scan_kernel, _align_scatter_kernel)

_BLOCK = 256


def align_items(topk_ids_TK: torch.Tensor, token_slot_T: torch.Tensor | None,
                slot_enabled_S: torch.Tensor | None, slot_rank_S: torch.Tensor | None,
                shared_S: torch.Tensor | None, *, num_experts: int, block_m: int,
                mode: str = "base", sort_by_slot: bool = False) -> Alignment:
    """Sort items into ``block_m`` blocks by bucket (see ``kernel.py`` for the item model).

    Args:
        topk_ids_TK: ``[T, K]`` int32 local expert ids, ``-1`` = not on this rank.
        token_slot_T: ``[T]`` int32 slot per token (``-1`` none); needed unless
            ``mode == "base"`` without ``sort_by_slot``.
        slot_enabled_S: ``[S]`` bool; slot_rank_S: ``[S]`` int32; shared_S: ``[S]`` bool
            (A shared by all experts; read in ``mode == "lora"`` only).
        mode: ``"base"`` (bucket = expert), ``"lora"`` (bucket = slot * E + expert for
            pairs of per-expert-A slots, slot * E for tokens of shared-A slots; items are
            ``T*K`` pairs then ``T`` tokens), ``"lora_pairs"`` (bucket = slot * E + expert
            for all pairs with an enabled slot).
        sort_by_slot: base mode only: order rows of an expert by slot so blocks see few slots.
    """
    if mode not in MODES:
        raise ValueError(f"unknown align mode {mode!r}; expected one of {sorted(MODES)}")
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids_TK.shape)}")
    T, K = topk_ids_TK.shape
    dev = topk_ids_TK.device
    needs_slots = mode != "base" or sort_by_slot
    if needs_slots and (token_slot_T is None or slot_enabled_S is None or slot_rank_S is None):
        raise ValueError(f"align mode {mode!r} (sort_by_slot={sort_by_slot}) needs "
                         "token_slot_T, slot_enabled_S and slot_rank_S")
    S = int(slot_rank_S.numel()) if slot_rank_S is not None else 0
    num_pairs = T * K
    num_items = num_pairs + (T if mode == "lora" else 0)
    num_buckets = num_experts if mode == "base" else S * num_experts
    num_sub = (S + 1) if (mode == "base" and sort_by_slot) else 1
    rows = max_rows(num_items, num_buckets, block_m)
    max_blocks = rows // block_m

    dummy_i = torch.empty(1, dtype=torch.int32, device=dev)
    tslot = token_slot_T if token_slot_T is not None else dummy_i
    en = slot_enabled_S if slot_enabled_S is not None else dummy_i
    rk = slot_rank_S if slot_rank_S is not None else dummy_i
    sh = shared_S if shared_S is not None else dummy_i
    ids = topk_ids_TK.contiguous()

    counts = torch.zeros((num_buckets + 1) * num_sub, dtype=torch.int32, device=dev)
    bucket_end = torch.empty(num_buckets + 1, dtype=torch.int32, device=dev)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    sorted_ids = torch.full((rows,), num_items, dtype=torch.int32, device=dev)
    block_bucket = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    mode_id = MODES[mode]
    common = (num_pairs, K, num_experts, num_buckets, num_sub)
    if num_items:
        _align_count_kernel[(triton.cdiv(num_items, _BLOCK),)](
            ids, tslot, en, rk, sh, counts, num_items, *common,
            MODE=mode_id, SUB_SLOT=sort_by_slot, BLOCK=_BLOCK)
    _align_scan_kernel[(1,)](
        counts, bucket_end, num_post_pad, num_buckets, num_sub, BLOCK_M=block_m,
        NB_P2=triton.next_power_of_2(num_buckets + 1), NS_P2=triton.next_power_of_2(num_sub))
    if num_items:
        _align_scatter_kernel[(triton.cdiv(num_items, _BLOCK),)](
            ids, tslot, en, rk, sh, counts, sorted_ids, num_items, *common,
            MODE=mode_id, SUB_SLOT=sort_by_slot, BLOCK=_BLOCK)
    _align_label_kernel[(num_buckets + 1,)](bucket_end, block_bucket, num_buckets, max_blocks,
                                            BLOCK_M=block_m, BLOCK_B=16)
    return Alignment(sorted_ids, block_bucket, num_post_pad, block_m, num_items)
