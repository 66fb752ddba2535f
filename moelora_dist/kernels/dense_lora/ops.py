"""Host glue of the dense-LoRA family: the Triton path of :func:`.naive.add_dense_lora`.

Pipeline of one forward: :func:`plan_tokens` sorts the tokens by slot once (4 small align
launches, shared by every dense module of the forward), then per group of modules that read
the same input one shrink launch (``x`` read once for all of them) and one expand launch per
module, which adds the delta into the base output in place. No host sync; every shape depends
on ``T`` and ``S`` only, so a CUDA graph captures it.

Precision: the shrink accumulates in fp32 and stays fp32 into the expand, whose ``tl.dot``
runs in TF32 on GPUs (as the MoE LoRA kernels do); the delta is added to ``y`` in fp32 and
rounded once. No global PyTorch flag is touched.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.align.common import Alignment
from moelora_dist.kernels.align.ops import align_items
from moelora_dist.kernels.constants import block_r
from moelora_dist.kernels.dense_lora.kernel import _dense_expand_kernel, _dense_shrink_kernel

MAX_GROUP = 3  # modules per shrink launch (q/k/v)


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


def add_dense_lora(ys: list[torch.Tensor], x_TI: torch.Tensor, a_list: list[torch.Tensor],
                   b_list: list[torch.Tensor], token_slot_T: torch.Tensor,
                   slot_rank_S: torch.Tensor, plan: Alignment | None = None) -> None:
    """See :func:`moelora_dist.kernels.dense_lora.naive.add_dense_lora`; ``plan`` from
    :func:`plan_tokens` (made here when None). ``ys`` must have unit stride in their last
    dim; every ``a`` of the group must have the same shape and strides."""
    T, I = x_TI.shape
    S, R, _ = a_list[0].shape
    if plan is None:
        plan = plan_tokens(token_slot_T.to(torch.int32), slot_rank_S > 0,
                           slot_rank_S.to(torch.int32))
    BR = block_r(R)
    n = len(a_list)
    if n > MAX_GROUP:
        for j in range(0, n, MAX_GROUP):
            add_dense_lora(ys[j:j + MAX_GROUP], x_TI, a_list[j:j + MAX_GROUP],
                           b_list[j:j + MAX_GROUP], token_slot_T, slot_rank_S, plan)
        return
    a0 = a_list[0]
    if any(a.shape != a0.shape or a.stride() != a0.stride() for a in a_list):
        raise ValueError("the modules of one dense LoRA group need A factors of one shape")
    shrink = torch.empty(n, T, BR, dtype=torch.float32, device=x_TI.device)
    pad = a_list + [a0] * (MAX_GROUP - n)
    _dense_shrink_kernel[(plan.max_blocks,)](
        x_TI, *pad, slot_rank_S, plan.sorted_ids, plan.block_bucket, plan.num_post_pad,
        shrink, T, I, x_TI.stride(0), x_TI.stride(1), *a0.stride(), shrink.stride(0),
        shrink.stride(1), NUM_MODULES=n, BLOCK_M=plan.block_m, BLOCK_K=64, BLOCK_R=BR)
    for j, (y, b) in enumerate(zip(ys, b_list)):
        O = y.shape[1]
        block_n = 64 if O <= 2048 or T <= 64 else 128
        grid = (plan.max_blocks * triton.cdiv(O, block_n),)
        _dense_expand_kernel[grid](
            y, shrink[j], b, slot_rank_S, plan.sorted_ids, plan.block_bucket,
            plan.num_post_pad, T, O, y.stride(0), y.stride(1), shrink.stride(1),
            *b.stride(), BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=BR)
