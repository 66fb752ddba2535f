"""Host glue of the align family: sizes, allocation and launches (no host sync).

Pipeline (4 launches for one alignment or for two of the same items, static shapes,
CUDA-graph safe for a fixed ``T``): one int32 workspace holds every output;
``zero_(counts)`` -> ``_align_count_kernel`` (fills the outputs, atomic histogram of
(bucket, sub) keys) -> ``_align_scan_kernel`` (one program per alignment: run starts, rows
in use) -> ``_align_scatter_kernel`` (items to their places; each item labels its block).
A small batch (decode steps: up to :data:`SINGLE_LAUNCH_MAX_ITEMS` items) runs the same four
phases in one launch, one thread block per alignment (``_align_single_kernel``), the same
outputs.
A LoRA call aligns the pairs by expert (base) and by slot and expert (LoRA) in the same four
launches (:func:`align_base_and_lora`).

Measured on an H100 (docs/kernels.md): an earlier version labelled the blocks inside the
scatter by counting bucket ends per block (O(blocks x buckets)) with acq_rel atomics; it took
45-600 us, as long as the whole base layer at T=1. Per-bucket labelling and relaxed atomics
fixed that; labelling by the items themselves then removed that launch.

Every output is sized for the worst case of ``num_items`` items, so its shape depends only on
``T``, ``K``, the bucket count and ``BLOCK_M``: at most ``min(num_buckets + 1, num_items)``
buckets are non-empty and each adds at most ``BLOCK_M - 1`` rows of padding. The grids of the
GEMMs are therefore bounded by the work that exists (items), never by ``S x E``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from moelora_dist.kernels.align.common import Alignment, max_rows
from moelora_dist.kernels.constants import ALIGN_MODES
from moelora_dist.kernels.align.kernel import (
    _align_count_kernel, _align_scan_kernel, _align_scatter_kernel, _align_single_kernel)

_BLOCK = 256
# One launch (``_align_single_kernel``: one thread block runs the four phases of an
# alignment, a second block the LoRA pair's other one) up to these sizes (items, rows filled).
# Decode steps sit far below them (64 sequences x top-8 = 512 pairs); prefill chunks take the
# four launches. Measured on an H200 (eager decode step, GPU us per layer, docs/kernels.md):
# the base alignment 4.11 -> 2.34 at 1 sequence and 4.65 -> 3.26 at 64, the LoRA pair
# 10.18 -> 6.61 and 10.99 -> 8.48.
SINGLE_LAUNCH_MAX_ITEMS = 2048
SINGLE_LAUNCH_MAX_FILL = 32768
SINGLE_LAUNCH_PAIRS = True  # False: the pair in four launches (A/B runs)
_SINGLE_BLOCK = 1024


@dataclass
class _Spec:
    """Sizes of one alignment inside the shared workspace."""

    mode: int
    sort_by_slot: bool
    num_items: int
    num_buckets: int
    num_sub: int
    block_m: int

    @property
    def rows(self) -> int:
        return max_rows(self.num_items, self.num_buckets, self.block_m)

    @property
    def num_counts(self) -> int:
        return (self.num_buckets + 1) * self.num_sub


def _spec(mode: str, sort_by_slot: bool, T: int, K: int, S: int, num_experts: int,
          block_m: int) -> _Spec:
    num_items = T * K + (T if mode == "lora" else 0)
    num_buckets = num_experts if mode == "base" else S * num_experts
    num_sub = (S + 1) if (mode == "base" and sort_by_slot) else 1
    return _Spec(ALIGN_MODES[mode], sort_by_slot, num_items, num_buckets, num_sub, block_m)


def _align(ids, tslot, en, rk, sh, a: _Spec, b: _Spec | None, num_experts: int):
    """Run the 4 launches for ``a`` (and ``b``) and return their :class:`Alignment` s."""
    T, K = ids.shape
    specs = [a] if b is None else [a, b]
    # One allocation: counts of every spec first (zeroed by one fill), then per spec
    # num_post_pad, sorted_ids and block labels (written by the kernels).
    n_counts = sum(s.num_counts for s in specs)
    sizes = [1 + s.rows + s.rows // s.block_m for s in specs]
    ws = torch.empty(n_counts + sum(sizes), dtype=torch.int32, device=ids.device)
    views, c0, o = [], 0, n_counts
    for s in specs:
        counts = ws[c0:c0 + s.num_counts]
        npp = ws[o:o + 1]
        sorted_ids = ws[o + 1:o + 1 + s.rows]
        labels = ws[o + 1 + s.rows:o + 1 + s.rows + s.rows // s.block_m]
        views.append((counts, npp, sorted_ids, labels))
        c0 += s.num_counts
        o += 1 + s.rows + s.rows // s.block_m
    vb = views[1] if b is not None else views[0]
    sb = b if b is not None else a
    (ca, na, ia, la), (cb, nb, ib, lb) = views[0], vb
    fill = max(max(s.rows, s.num_items) for s in specs)
    common = (T * K, K, num_experts)
    items = max(s.num_items for s in specs)
    if (items <= SINGLE_LAUNCH_MAX_ITEMS and fill <= SINGLE_LAUNCH_MAX_FILL
            and (b is None or SINGLE_LAUNCH_PAIRS)):
        _align_single_kernel[(len(specs),)](
            ids, tslot, en, rk, sh, ca, ia, la, na, cb, ib, lb, nb,
            a.num_items, a.rows, a.rows // a.block_m, a.num_buckets, a.num_sub,
            sb.num_items, sb.rows, sb.rows // sb.block_m, sb.num_buckets, *common,
            MODE_A=a.mode, SUB_SLOT_A=a.sort_by_slot, BM_A=a.block_m,
            NB_A_P2=triton.next_power_of_2(a.num_buckets + 1),
            NS_A_P2=triton.next_power_of_2(a.num_sub), MODE_B=sb.mode, BM_B=sb.block_m,
            NB_B_P2=triton.next_power_of_2(sb.num_buckets + 1), BLOCK=_SINGLE_BLOCK,
            num_warps=8)
        return [Alignment(v[2], v[3], v[1], s.block_m, s.num_items)
                for s, v in zip(specs, views)]
    ws[:n_counts].zero_()
    if fill:
        _align_count_kernel[(triton.cdiv(fill, _BLOCK),)](
            ids, tslot, en, rk, sh, ca, ia, la, cb, ib, lb,
            a.num_items, a.rows, a.rows // a.block_m, a.num_buckets, a.num_sub,
            sb.num_items, sb.rows, sb.rows // sb.block_m, sb.num_buckets, *common,
            MODE_A=a.mode, SUB_SLOT_A=a.sort_by_slot, MODE_B=sb.mode, TWO=b is not None,
            BLOCK=_BLOCK)
    _align_scan_kernel[(len(specs),)](
        ca, na, a.num_buckets, a.num_sub, cb, nb, sb.num_buckets,
        BM_A=a.block_m, NB_A_P2=triton.next_power_of_2(a.num_buckets + 1),
        NS_A_P2=triton.next_power_of_2(a.num_sub), BM_B=sb.block_m,
        NB_B_P2=triton.next_power_of_2(sb.num_buckets + 1))
    if items:
        _align_scatter_kernel[(triton.cdiv(items, _BLOCK),)](
            ids, tslot, en, rk, sh, ca, ia, la, cb, ib, lb, a.num_items, a.num_buckets,
            a.num_sub, sb.num_items, sb.num_buckets, *common,
            MODE_A=a.mode, SUB_SLOT_A=a.sort_by_slot, BM_A=a.block_m, MODE_B=sb.mode,
            BM_B=sb.block_m, TWO=b is not None, BLOCK=_BLOCK)
    return [Alignment(v[2], v[3], v[1], s.block_m, s.num_items) for s, v in zip(specs, views)]


def _inputs(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S):
    dummy = torch.empty(1, dtype=torch.int32, device=topk_ids_TK.device)
    pick = lambda t: t if t is not None else dummy  # noqa: E731
    return (topk_ids_TK.contiguous(), pick(token_slot_T), pick(slot_enabled_S),
            pick(slot_rank_S), pick(shared_S))


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
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown align mode {mode!r}; expected one of {sorted(ALIGN_MODES)}")
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids_TK.shape)}")
    needs_slots = mode != "base" or sort_by_slot
    if needs_slots and (token_slot_T is None or slot_enabled_S is None or slot_rank_S is None):
        raise ValueError(f"align mode {mode!r} (sort_by_slot={sort_by_slot}) needs "
                         "token_slot_T, slot_enabled_S and slot_rank_S")
    T, K = topk_ids_TK.shape
    S = int(slot_rank_S.numel()) if slot_rank_S is not None else 0
    spec = _spec(mode, sort_by_slot, T, K, S, num_experts, block_m)
    ins = _inputs(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S)
    return _align(*ins, spec, None, num_experts)[0]


def align_base_and_lora(topk_ids_TK: torch.Tensor, token_slot_T: torch.Tensor,
                        slot_enabled_S: torch.Tensor, slot_rank_S: torch.Tensor,
                        shared_S: torch.Tensor, *, num_experts: int, block_m: int,
                        lora_block_m: int) -> tuple[Alignment, Alignment]:
    """``align_items(mode="base", sort_by_slot=True)`` and ``align_items(mode="lora")`` of the
    same pairs in one set of 4 launches (a LoRA call needs both; shapes as there).

    Returns:
        (base alignment with ``block_m`` rows per block, LoRA alignment with ``lora_block_m``).
    """
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids_TK.shape)}")
    T, K = topk_ids_TK.shape
    S = int(slot_rank_S.numel())
    a = _spec("base", True, T, K, S, num_experts, block_m)
    b = _spec("lora", False, T, K, S, num_experts, lora_block_m)
    ins = _inputs(topk_ids_TK, token_slot_T, slot_enabled_S, slot_rank_S, shared_S)
    base, lora = _align(*ins, a, b, num_experts)
    return base, lora
