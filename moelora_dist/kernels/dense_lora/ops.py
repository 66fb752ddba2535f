"""Host glue of the dense-LoRA family: the Triton path of :func:`.naive.add_dense_lora`.

Pipeline of one forward: :func:`plan_tokens` sorts the tokens by slot once (4 small align
launches, shared by every dense module of the forward), then per group of modules that read
the same input one shrink launch (``x`` read once for all of them; its input features split
over several programs per token block at decode sizes, :func:`shrink_split`) and one expand
launch for all of them, which adds each module's delta into its base output in place. No
host sync; every shape depends on ``T``, ``S`` and the module shapes only, so a CUDA graph
captures it.

Precision: the shrink accumulates in fp32 and stays fp32 into the expand, whose ``tl.dot``
runs in TF32 on GPUs (as the MoE LoRA kernels do); the delta is added to ``y`` in fp32 and
rounded once. No global PyTorch flag is touched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from moelora_dist.kernels.align.common import Alignment
from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.constants import block_r
from moelora_dist.kernels.dense_lora.kernel import _dense_expand_kernel, _dense_shrink_kernel
from moelora_dist.kernels.device import num_sms, split_columns, splits_to_fill

MAX_GROUP = 3  # modules per launch (q/k/v)
BLOCK_K = 64  # the shrink's K tile
MIN_K_TILES = 4  # K tiles a split shrink program loops over at least
MAX_SPLIT_K = 16
# Partials of a split shrink the expand loads at once (a loop of one per step waited for each
# load in turn); 1 where the shrink is not split (prefill tiles keep their registers).
EXPAND_UNROLL = 8


class TokenLoRA(NamedTuple):
    """The LoRA of a group whose expand a per-token consumer kernel fuses (the page write for
    q/k/v, the residual add + norm for o): the group's shrink partials, each module's ``b``
    and the tables that say which tokens have a delta. Made by the model's ``PendingLoRA``
    once the shrink is queued; the consumer adds ``b[slot] s`` to what it loads."""

    shrink: torch.Tensor  # [P, n, T, BR] fp32 partials (dense_shrink)
    b_list: list  # per module [S, O_j, R] (views allowed)
    token_slot_T: torch.Tensor  # [T] int32, -1 none
    slot_enabled_S: torch.Tensor  # [S] bool
    slot_rank_S: torch.Tensor  # [S] int32

    @property
    def block_r(self) -> int:
        return int(self.shrink.shape[3])

    def shrink_args(self) -> tuple:
        """What the kernels' ``_token_shrink`` takes: the partials, their count and strides
        (split, module, token), and the three tables."""
        return (self.shrink, int(self.shrink.shape[0]), *self.shrink.stride()[:3],
                self.token_slot_T, self.slot_enabled_S, self.slot_rank_S)


def _block_m(num_tokens: int, num_slots: int) -> int:
    per_slot = num_tokens / max(num_slots, 1)
    return 16 if per_slot <= 16 else (32 if per_slot <= 64 else 64)


def plan_tokens(token_slot_T: torch.Tensor, slot_enabled_S: torch.Tensor,
                slot_rank_S: torch.Tensor) -> Alignment:
    """Tokens sorted into blocks of one slot (``token_slot_T [T]`` int32, ``-1`` none)."""
    T, S = int(token_slot_T.shape[0]), int(slot_rank_S.shape[0])
    ids = torch.zeros(T, 1, dtype=torch.int32, device=token_slot_T.device)  # one "expert"
    return align_items(ids, token_slot_T, slot_enabled_S, slot_rank_S, None, num_experts=1,
                       block_m=_block_m(T, S), mode="lora_pairs")


def shrink_split(max_blocks: int, in_dim: int, sms: int) -> int:
    """Programs per shrink block: enough for about two per SM, each with at least
    ``MIN_K_TILES`` K tiles, never a chunk with nothing to do."""
    k_tiles = triton.cdiv(in_dim, BLOCK_K)
    split = splits_to_fill(max_blocks, k_tiles, sms, MIN_K_TILES, MAX_SPLIT_K)
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def add_dense_lora(ys: list[torch.Tensor], x_TI: torch.Tensor, a_list: list[torch.Tensor],
                   b_list: list[torch.Tensor], token_slot_T: torch.Tensor,
                   slot_rank_S: torch.Tensor, plan: Alignment | None = None,
                   split_k: int | None = None) -> None:
    """See :func:`moelora_dist.kernels.dense_lora.naive.add_dense_lora`; ``plan`` from
    :func:`plan_tokens` (made here when None); ``split_k``: the shrink's K chunks per block
    (None: :func:`shrink_split`). ``ys`` must have unit stride in their last dim; every ``a``
    of the group must have the same shape and strides. The two launches of each group of up to
    :data:`MAX_GROUP` modules are :func:`dense_shrink` and :func:`dense_expand` (a caller may
    run the shrink on another stream, beside the base GEMMs)."""
    if plan is None:
        plan = plan_tokens(token_slot_T.to(torch.int32), slot_rank_S > 0,
                           slot_rank_S.to(torch.int32))
    shrinks = dense_shrink(x_TI, a_list, slot_rank_S, plan, split_k)
    dense_expand(ys, b_list, shrinks, slot_rank_S, plan)


def dense_shrink(x_TI: torch.Tensor, a_list: list[torch.Tensor], slot_rank_S: torch.Tensor,
                 plan: Alignment, split_k: int | None = None) -> list[torch.Tensor]:
    """The shrink launches of a group: one per :data:`MAX_GROUP` modules, each returning its
    ``[P, n, T, BR]`` fp32 partial sums (``P`` splits of the input features)."""
    if len(a_list) > MAX_GROUP:
        return [s for j in range(0, len(a_list), MAX_GROUP)
                for s in dense_shrink(x_TI, a_list[j:j + MAX_GROUP], slot_rank_S, plan,
                                      split_k)]
    T, I = x_TI.shape
    S, R, _ = a_list[0].shape
    BR = block_r(R)
    n = len(a_list)
    a0 = a_list[0]
    if any(a.shape != a0.shape or a.stride() != a0.stride() for a in a_list):
        raise ValueError("the modules of one dense LoRA group need A factors of one shape")
    blocks = plan.max_blocks
    split = split_k or shrink_split(blocks, I, num_sms(x_TI.device))
    k_per_split, split = split_columns(I, split, BLOCK_K)  # no chunk past the end
    shrink = torch.empty(split, n, T, BR, dtype=torch.float32, device=x_TI.device)
    pad_a = a_list + [a0] * (MAX_GROUP - n)
    _dense_shrink_kernel[(blocks, split)](
        x_TI, *pad_a, slot_rank_S, plan.sorted_ids, plan.block_bucket, plan.num_post_pad,
        shrink, T, I, k_per_split, x_TI.stride(0), x_TI.stride(1), *a0.stride(),
        *shrink.stride()[:3], NUM_MODULES=n, BLOCK_M=plan.block_m, BLOCK_K=BLOCK_K,
        BLOCK_R=BR)
    return [shrink]


def dense_expand(ys: list[torch.Tensor], b_list: list[torch.Tensor],
                 shrinks: list[torch.Tensor], slot_rank_S: torch.Tensor,
                 plan: Alignment) -> None:
    """The expand launches of a group (``shrinks`` from :func:`dense_shrink` of the same
    modules, in order): each module's delta added into its ``y`` in place."""
    if len(shrinks) != triton.cdiv(len(ys), MAX_GROUP) or len(ys) != len(b_list):
        raise ValueError(f"{len(ys)} outputs, {len(b_list)} B factors and {len(shrinks)} "
                         f"shrink buffers do not make groups of up to {MAX_GROUP}")
    if len(ys) > MAX_GROUP:
        for g, j in enumerate(range(0, len(ys), MAX_GROUP)):
            dense_expand(ys[j:j + MAX_GROUP], b_list[j:j + MAX_GROUP], shrinks[g:g + 1],
                         slot_rank_S, plan)
        return
    shrink = shrinks[0]
    split, n, T, BR = shrink.shape
    blocks = plan.max_blocks
    outs = [y.shape[1] for y in ys]
    block_n = 64 if max(outs) <= 2048 or T <= 64 else 128
    tiles = [triton.cdiv(o, block_n) for o in outs]
    pad = MAX_GROUP - n
    ys_p, bs_p = ys + [ys[0]] * pad, b_list + [b_list[0]] * pad
    outs_p, tiles_p = outs + [0] * pad, tiles + [0] * pad
    _dense_expand_kernel[(blocks, sum(tiles))](
        *ys_p, *bs_p, shrink, slot_rank_S, plan.sorted_ids, plan.block_bucket,
        plan.num_post_pad, T, *outs_p, tiles_p[0], tiles_p[1],
        *(st for y in ys_p for st in y.stride()), *(st for b in bs_p for st in b.stride()),
        split, *shrink.stride()[:3], NUM_MODULES=n, BLOCK_M=plan.block_m,
        BLOCK_N=block_n, BLOCK_R=BR, UNROLL=EXPAND_UNROLL if split > 1 else 1)
