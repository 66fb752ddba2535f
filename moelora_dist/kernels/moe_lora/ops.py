"""Local experts with multi-LoRA on the GPU: the Triton pipeline of the ``moe_lora`` family.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, X = 2 I_l (gate rows
then up rows), K top-k, S slots, R max rank, BR padded rank (power of two >= 16).

    align(base, by expert, rows ordered by slot)      4 small launches (a fill + 3 kernels)
    [LoRA] align(lora, by slot*E_l + expert)          in the same 4 launches
    [LoRA] lora_shrink  x A^T                         -> [P, T*K + T, 2BR] fp32 partials
    gate_up (+ expand, act)                           -> h [T*K, I_l]
    [LoRA] down_shrink  h A_down^T                    -> [P, T*K, BR] fp32 partials
    down (+ expand, x top-k weight)                   -> [T*K, H]
    topk_sum                                          -> y [T, H]  (or the caller's:
                                                         ``sum_pairs=False``)

``MoEConfig.fuse_shrink`` moves the shrink into the gate_up launch (no LoRA alignment, no
shrink launch); ``fuse_down_shrink`` moves the down shrink into the gate_up epilogue. With both,
a LoRA call has the launches of the base layer. The rank tile BR follows ``max_lora_rank`` (the
largest rank of the batch's adapters) when the caller knows it, else the pool's max rank.

Shapes of every buffer depend on T only (worst-case sizing), and nothing syncs with the host
unless ``slot_enabled_S`` must be checked for "no adapter in this batch" outside a CUDA-graph
capture; pass ``lora=None`` (the layer knows ``BatchInfo.num_lora_tokens``) to skip the LoRA
path with no sync at all.
"""

from __future__ import annotations

import torch

import functools

from moelora_dist.kernels.align.ops import align_base_and_lora, align_items
from moelora_dist.kernels.block_fp8 import ops as fp8_ops
from moelora_dist.kernels.constants import as_activation, block_r, check_activation
from moelora_dist.kernels.device import capturing
from moelora_dist.kernels.moe_gemm import ops
from moelora_dist.kernels.moe_gemm.ops_fused import gate_up_lora
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import MoEConfig, config_and_source, pick_config
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.kernels.weights_fp8 import is_fp8


@functools.lru_cache(maxsize=64)
def _device_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str | None:
    """The name tuned files are keyed by (``torch.cuda.get_device_name``); None off CUDA (the
    interpreter runs the heuristic's tiles)."""
    if device.type != "cuda":
        return None
    return _device_name_of(device.index if device.index is not None
                           else torch.cuda.current_device())


def _pick_args(x_TH, w_gate_up_EXH, top_k, lora):
    T, H = x_TH.shape
    E, two_i, _ = w_gate_up_EXH.shape
    dtype = tuned.dtype_key(str(x_TH.dtype).replace("torch.", ""), is_fp8(w_gate_up_EXH))
    return (T, top_k, E, lora.num_slots if lora is not None else 1), dict(
        hidden=H, inter=two_i // 2, dtype=dtype, device_name=device_name(x_TH.device),
        lora_rank=block_r(lora.max_rank) if lora is not None else None)


def config_for(x_TH: torch.Tensor, w_gate_up_EXH: torch.Tensor, top_k: int,
               lora: MoELoRAWeights | None) -> MoEConfig:
    """What :func:`fused_moe_lora` runs when given no config (``lora`` as it passes it to the
    kernels: a :meth:`~MoELoRAWeights.rank_view` when the batch's rank is known)."""
    args, kw = _pick_args(x_TH, w_gate_up_EXH, top_k, lora)
    return pick_config(*args, **kw)


def config_source(x_TH, w_gate_up_EXH, top_k: int, lora) -> str:
    """Where :func:`config_for`'s answer comes from (``configs.config_and_source``)."""
    args, kw = _pick_args(x_TH, w_gate_up_EXH, top_k, lora)
    return config_and_source(*args, **kw)[1]


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
                   max_lora_rank: int | None = None,
                   b_gate_up_EX: torch.Tensor | None = None,
                   b_down_EH: torch.Tensor | None = None,
                   sum_pairs: bool = True) -> torch.Tensor:
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
        max_lora_rank: host-side largest rank of the slots this batch enables
            (``BatchInfo.max_rank``); the rank tiles follow it (``MoELoRAWeights.rank_view``).
            It must not be below any enabled slot's rank. None: the pool's max rank.
        activation: a name or an ``Activation`` (gpt-oss's clamped SwiGLU).
        b_gate_up_EX: ``[E_l, 2*I_l]``, b_down_EH: ``[E_l, H]`` expert biases, or None (the
            down bias on one rank of a MoE-TP group only).
        sum_pairs: False returns the pair outputs before their top-k sum
            (:class:`~moelora_dist.kernels.moe_gemm.ops.PairOutputs`) for a consumer that
            sums them itself, one launch less.
    Returns:
        ``[T, H]`` in ``x_TH.dtype`` (or its ``PairOutputs``).
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
        elif (num_lora_tokens is None and not capturing(x_TH.device)
              and not bool(slot_enabled_S.any())):
            lora = None  # no adapter in this batch: skip the LoRA path, do not run it on zeros
    if lora is not None and max_lora_rank is not None:
        if not 1 <= int(max_lora_rank) <= lora.max_rank:
            raise ValueError(f"max_lora_rank={max_lora_rank} must be in [1, {lora.max_rank}] "
                             "(the pool's max rank)")
        lora = lora.rank_view(block_r(max_lora_rank))
    cfg = config or config_for(x_TH, w_gate_up_EXH, K, lora)
    if lora is None:
        base = align_items(topk_ids_TK, None, None, None, None, num_experts=E,
                           block_m=cfg.block_m, mode="base")
        xa, xkw = gemm_input(cfg, x_TH, w_gate_up_EXH, "x_scale")
        h = ops.gate_up(xa, w_gate_up_EXH, base, K, activation=activation,
                        bias_EX=b_gate_up_EX, block_n=cfg.block_n, block_k=cfg.block_k,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        group_m=cfg.group_m, out_dtype=x_TH.dtype, **xkw)
        ha, hkw = gemm_input(cfg, h, w_down_EHI, "h_scale")
        out = ops.down(ha, w_down_EHI, topk_weights_TK, base, K, bias_EH=b_down_EH,
                       out_dtype=h.dtype, **cfg.down_tiles(), **hkw)
        pairs = ops.PairOutputs(out, topk_ids_TK, E)
    else:
        pairs = _lora_pipeline(cfg, x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK,
                               topk_ids_TK, token_slot_T, lora, activation, slot_enabled_S,
                               b_gate_up_EX, b_down_EH)
    return pairs.sum() if sum_pairs else pairs


def gemm_input(cfg: MoEConfig, a: torch.Tensor, w, scale_kw: str):
    """What a base GEMM reads: ``(a, {})``, or with FP8 weights and ``cfg.fp8_prequant`` the
    e4m3 values of ``a`` and ``{scale_kw: their scales}``, quantized once here instead of in
    every n-tile program's K loop (the same numbers either way)."""
    if not (is_fp8(w) and cfg.fp8_prequant):
        return a, {}
    q, s = fp8_ops.quantize_act(a)
    return q, {scale_kw: s}


def _lora_pipeline(cfg: MoEConfig, x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK,
                   topk_ids_TK, token_slot_T, lora: MoELoRAWeights, activation,
                   slot_enabled_S, b_gate_up_EX=None,
                   b_down_EH=None) -> "ops.PairOutputs":
    """The launches of a LoRA call under ``cfg``'s switches (shapes as in fused_moe_lora), up
    to the pair outputs (the top-k sum is the caller's).
    The fused-shrink gate_up has no bias or clamped-SwiGLU variant: gpt-oss's experts (and FP8
    ones) take the separate shrink whatever ``cfg.fuse_shrink`` says."""
    E = w_gate_up_EXH.shape[0]
    K = topk_ids_TK.shape[1]
    slots = (token_slot_T, slot_enabled_S)
    ds_runs = cfg.down_shrink_runs_for(lora.max_rank)
    tiles = dict(block_n=cfg.block_n, block_k=cfg.block_k, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, lora_runs=cfg.lora_runs,
                 fuse_down_shrink=cfg.fuse_down_shrink, down_shrink_runs=ds_runs or 1,
                 group_m=cfg.group_m)
    plain = b_gate_up_EX is None and check_activation(as_activation(activation)) < 2
    if cfg.fuse_shrink and plain and not is_fp8(w_gate_up_EXH):  # it reads bf16/fp16 W
        base = align_items(topk_ids_TK, token_slot_T, slot_enabled_S, lora.slot_rank, None,
                           num_experts=E, block_m=cfg.block_m, mode="base", sort_by_slot=True)
        res = gate_up_lora(x_TH, w_gate_up_EXH, base, K, *slots, lora, activation, **tiles)
    else:
        base, la = align_base_and_lora(topk_ids_TK, token_slot_T, slot_enabled_S,
                                       lora.slot_rank, lora.gate_up_a_shared, num_experts=E,
                                       block_m=cfg.block_m, lora_block_m=cfg.lora_block_m)
        shrink = ops.lora_shrink(x_TH, lora, la, K, block_k=cfg.shrink_block_k,
                                 num_warps=cfg.shrink_num_warps, split_k=cfg.shrink_split_k)
        xa, xkw = gemm_input(cfg, x_TH, w_gate_up_EXH, "x_scale")  # the shrink read bf16 x
        res = ops.gate_up(xa, w_gate_up_EXH, base, K, *slots, lora, shrink, activation,
                          b_gate_up_EX, run_loop=cfg.run_loop, out_dtype=x_TH.dtype,
                          **tiles, **xkw)
    if cfg.fuse_down_shrink:
        h, dshrink = res
    else:
        h = res
        dshrink = ops.down_shrink(h, lora, base, K, *slots, block_k=cfg.shrink_block_k,
                                  lora_runs=ds_runs, split_k=cfg.down_shrink_split_k)
    ha, hkw = gemm_input(cfg, h, w_down_EHI, "h_scale")  # the down shrink read bf16 h
    out = ops.down(ha, w_down_EHI, topk_weights_TK, base, K, *slots, lora, dshrink, b_down_EH,
                   run_loop=cfg.run_loop, lora_runs=cfg.lora_runs, out_dtype=h.dtype,
                   prefetch=cfg.lora_prefetch, **cfg.down_tiles(), **hkw)
    return ops.PairOutputs(out, topk_ids_TK, E)
