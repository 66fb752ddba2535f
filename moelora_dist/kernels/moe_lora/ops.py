"""Local experts with multi-LoRA on the GPU: the Triton pipeline of the ``moe_lora`` family.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, X = 2 I_l (gate rows
then up rows), K top-k, S slots, R max rank, BR padded rank (power of two >= 16).

    align(base, by expert, rows ordered by slot)      4 small launches (a fill + 3 kernels)
    [LoRA] align(lora, by slot*E_l + expert)          in the same 4 launches
    [LoRA] lora_shrink  x A^T                         -> [T*K + T, 2BR] fp32
    gate_up (+ expand, act)                           -> h [T*K, I_l]
    [LoRA] down_shrink  h A_down^T                    -> [T*K, BR] fp32
    down (+ expand, x top-k weight)                   -> [T*K, H]
    topk_sum                                          -> y [T, H]

Shapes of every buffer depend on T only (worst-case sizing), and nothing syncs with the host
unless ``slot_enabled_S`` must be checked for "no adapter in this batch" outside a CUDA-graph
capture; pass ``lora=None`` (the layer knows ``BatchInfo.num_lora_tokens``) to skip the LoRA
path with no sync at all.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.align.ops import align_base_and_lora, align_items
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.kernels.moe_lora.configs import MoEConfig, pick_config
from moelora_dist.kernels.weights import MoELoRAWeights


def _capturing(x_TH: torch.Tensor) -> bool:
    return x_TH.is_cuda and torch.cuda.is_current_stream_capturing()


def _check(x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK, topk_ids_TK, token_slot_T, lora):
    T, H = x_TH.shape
    E, two_i, h2 = w_gate_up_EXH.shape
    if h2 != H or two_i % 2:
        raise ValueError(f"w_gate_up must be [E_l, 2*I_l, H={H}], got {tuple(w_gate_up_EXH.shape)}")
    if tuple(w_down_EHI.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must be [E_l={E}, H={H}, I_l={two_i // 2}], "
                         f"got {tuple(w_down_EHI.shape)}")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != T:
        raise ValueError(f"topk_ids {tuple(topk_ids_TK.shape)} and topk_weights "
                         f"{tuple(topk_weights_TK.shape)} must both be [T={T}, K]")
    if topk_ids_TK.dtype != torch.int32:
        raise ValueError(f"topk_ids must be int32, got {topk_ids_TK.dtype}")
    if lora is not None:
        if token_slot_T is None or token_slot_T.shape != (T,):
            raise ValueError(f"a LoRA call needs token_slot_T of shape [T={T}]")
        if token_slot_T.dtype != torch.int32:
            raise ValueError(f"token_slot_T must be int32, got {token_slot_T.dtype}")
        if (lora.num_local_experts, lora.hidden, lora.i_local) != (E, H, two_i // 2):
            raise ValueError(
                f"LoRA buffers are for E_l={lora.num_local_experts}, H={lora.hidden}, "
                f"I_l={lora.i_local} but the layer has E_l={E}, H={H}, I_l={two_i // 2}")


def fused_moe_lora(x_TH: torch.Tensor, w_gate_up_EXH: torch.Tensor, w_down_EHI: torch.Tensor,
                   topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                   token_slot_T: torch.Tensor | None = None, lora: MoELoRAWeights | None = None,
                   activation="silu", slot_enabled_S: torch.Tensor | None = None,
                   config: MoEConfig | None = None,
                   num_lora_tokens: int | None = None,
                   b_gate_up_EX: torch.Tensor | None = None,
                   b_down_EH: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of :func:`moelora_dist.kernels.moe_lora.naive.experts_reference`.

    Args:
        x_TH: ``[T, H]`` bf16/fp16/fp32 tokens.
        w_gate_up_EXH: ``[E_l, 2*I_l, H]``; w_down_EHI: ``[E_l, H, I_l]`` (x dtype).
        topk_weights_TK: ``[T, K]`` fp32; topk_ids_TK: ``[T, K]`` int32 local ids, ``-1`` skip.
        token_slot_T: ``[T]`` int32 slot per token, ``-1`` = no adapter.
        lora: pool buffers of this layer, or None (base only).
        slot_enabled_S: ``[S]`` bool from the batch info; None means "every slot of rank > 0".
            Tokens of a disabled slot get no delta.
        config: tile sizes; picked from the shapes when None.
        num_lora_tokens: host-side count from ``BatchInfo``; ``0`` skips the LoRA path with no
            sync. When None, a non-capturing call checks ``slot_enabled_S.any()`` on the host
            (a sync that costs the CPU/GPU overlap: ~0.1-0.2 ms at decode sizes, measured).
        activation: a name or an ``Activation`` (gpt-oss's clamped SwiGLU).
        b_gate_up_EX: ``[E_l, 2*I_l]``, b_down_EH: ``[E_l, H]`` expert biases, or None (the
            down bias on one rank of a MoE-TP group only).
    Returns:
        ``[T, H]`` in ``x_TH.dtype``.
    """
    _check(x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK, topk_ids_TK, token_slot_T, lora)
    T, _ = x_TH.shape
    E = w_gate_up_EXH.shape[0]
    K = topk_ids_TK.shape[1]
    if lora is not None and num_lora_tokens == 0:
        lora = None  # the batch info says no token has an adapter: skip, not run on zeros
    if lora is not None:
        if slot_enabled_S is None:
            slot_enabled_S = lora.slot_rank > 0
        elif num_lora_tokens is None and not _capturing(x_TH) and not bool(slot_enabled_S.any()):
            lora = None  # no adapter in this batch: skip the LoRA path, do not run it on zeros
    cfg = config or pick_config(T, K, E, lora.num_slots if lora is not None else 1)
    has_lora = lora is not None
    shrink = None
    if has_lora:
        base, la = align_base_and_lora(topk_ids_TK, token_slot_T, slot_enabled_S,
                                       lora.slot_rank, lora.gate_up_a_shared, num_experts=E,
                                       block_m=cfg.block_m, lora_block_m=cfg.lora_block_m)
        shrink = ops.lora_shrink(x_TH, lora, la, K, block_k=cfg.shrink_block_k)
    else:
        base = align_items(topk_ids_TK, None, None, None, None, num_experts=E,
                           block_m=cfg.block_m, mode="base")
    h = ops.gate_up(x_TH, w_gate_up_EXH, base, K, token_slot_T, slot_enabled_S, lora, shrink,
                    activation, b_gate_up_EX, block_n=cfg.block_n, block_k=cfg.block_k,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, run_loop=cfg.run_loop,
                    lora_runs=cfg.lora_runs)
    dshrink = None
    if has_lora:
        dshrink = ops.down_shrink(
            h, lora, base, K, token_slot_T, slot_enabled_S, block_k=cfg.shrink_block_k,
            lora_runs=cfg.down_shrink_runs_for(lora.max_rank))
    out = ops.down(h, w_down_EHI, topk_weights_TK, base, K, token_slot_T, slot_enabled_S, lora,
                   dshrink, b_down_EH, block_n=cfg.down_block_n, block_k=cfg.block_k,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, run_loop=cfg.run_loop,
                   lora_runs=cfg.lora_runs)
    return ops.topk_sum(out, topk_ids_TK, E)
