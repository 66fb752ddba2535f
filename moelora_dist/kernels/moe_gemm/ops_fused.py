"""Host glue of the fused-shrink gate_up (``MoEConfig.fuse_shrink``): one launch does the base
gate_up GEMM, the LoRA shrink ``x A^T`` inside its K loop, the expand and the activation (and,
with ``fuse_down_shrink``, the down shrink in its epilogue). See ``kernel_gate_up_lora.py``.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, K top-k, BR rank tile.
"""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.align.common import Alignment
from moelora_dist.kernels.constants import block_r, check_activation
from moelora_dist.kernels.moe_gemm.kernel_gate_up_lora import _gate_up_lora_kernel
from moelora_dist.kernels.moe_gemm.ops import check_group_m, empty_down_shrink_parts, num_runs
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.kernels.weights_fp8 import is_fp8


def gate_up_lora(x_TH: torch.Tensor, w_gate_up_EXH: torch.Tensor, al: Alignment, top_k: int,
                 token_slot_T: torch.Tensor, slot_enabled_S: torch.Tensor,
                 lora: MoELoRAWeights, activation: str = "silu", *, block_n: int = 64,
                 block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
                 lora_runs: int = 2, fuse_down_shrink: bool = False,
                 down_shrink_runs: int = 1, group_m: int = 1):
    """gate_up + LoRA (shrink, expand) + activation in one launch, for a base alignment.

    Args:
        x_TH: ``[T, H]``; w_gate_up_EXH: ``[E_l, 2*I_l, H]`` (gate rows then up rows).
        al: base alignment of the ``T*K`` pairs by expert, rows ordered by slot
            (``align_items(mode="base", sort_by_slot=True)``; any order is correct, the sort
            keeps the runs per block few).
        token_slot_T: ``[T]`` int32; slot_enabled_S: ``[S]`` bool.
        lora_runs: slot runs whose shrink rides the main K loop (and per expand dot); a block
            with more runs adds one pass over K per further ``lora_runs`` runs.
        fuse_down_shrink: also the down shrink in the epilogue, ``down_shrink_runs`` per dot.
        group_m: the program order (:func:`~moelora_dist.kernels.moe_gemm.ops.gate_up`).
    Returns:
        ``h`` ``[T*K, I_l]`` in ``x_TH.dtype``, or ``(h, dshrink_parts)`` with
        ``fuse_down_shrink`` (as :func:`moelora_dist.kernels.moe_gemm.ops.gate_up`).
    """
    act = check_activation(activation)
    if act > 1:  # its epilogue has SiLU and GELU only (no bias, no clamp)
        raise ValueError("gate_up_lora has no clamped-SwiGLU (gpt-oss) variant; those experts "
                         "take the separate shrink (fused_moe_lora does so for fuse_shrink)")
    if is_fp8(w_gate_up_EXH):
        raise ValueError("gate_up_lora reads bf16/fp16/fp32 expert weights; FP8 experts take "
                         "the separate shrink (fused_moe_lora does so for fuse_shrink)")
    T, H = x_TH.shape
    E, two_i, _ = w_gate_up_EXH.shape
    inter = two_i // 2
    N = T * top_k
    h = torch.empty(N, inter, dtype=x_TH.dtype, device=x_TH.device)
    BR = block_r(lora.max_rank)
    dparts = (empty_down_shrink_parts(N, inter, block_n, lora.max_rank, x_TH.device)
              if fuse_down_shrink else None)
    w, a, b, da = w_gate_up_EXH, lora.gate_up_a, lora.gate_up_b, lora.down_a
    grid = (al.max_blocks * triton.cdiv(inter, block_n),)
    _gate_up_lora_kernel[grid](
        x_TH, w, h, al.sorted_ids, al.block_bucket, al.num_post_pad, token_slot_T,
        slot_enabled_S, lora.slot_rank, lora.gate_up_a_shared, a, b, da,
        dparts if dparts is not None else h,
        N, top_k, H, inter, lora.a_half_rows, dparts[0].numel() if dparts is not None else 0,
        x_TH.stride(0), x_TH.stride(1), *w.stride(), *a.stride(), *b.stride(), *da.stride(),
        check_group_m(group_m), ACT=act, BLOCK_M=al.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=BR, NUM_RUNS=num_runs(lora_runs), FUSE_DOWN_SHRINK=fuse_down_shrink,
        DS_RUNS=num_runs(down_shrink_runs), num_warps=num_warps, num_stages=num_stages)
    return (h, dparts) if fuse_down_shrink else h
