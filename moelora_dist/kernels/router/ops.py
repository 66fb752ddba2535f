"""Host glue of the top-k routers: the Triton path of :mod:`.naive`, one launch per call
(the reference is six: the fp32 cast, softmax, the top-k's select and sort, the sum and the
division of the renormalization, the int32 cast). No host sync; CUDA-graph safe.

:func:`gemm_softmax_topk` also takes the router GEMM into the launch (decode sizes: the
GEMM's 512 KB weight at Qwen3-30B-A3B is pure latency). Its grid is (token blocks of 16,
expert chunks of :data:`FUSED_EXPERTS_PER_PROGRAM`, :data:`FUSED_H_SPLITS` slices of the
hidden dim); each program writes an fp32 partial, and the last program to finish a token
block adds its partials in slice order, rounds them once to the logits' dtype and routes the
block, counted in an int32 counter per token block that the launch leaves at 0. The
counters are cached per device and allocated outside CUDA-graph capture only (a capture that
would need more than the cache holds takes the unfused path); outgrown ones are kept alive,
since a captured graph may still point at them. Two fused launches must not run at once on
one device (they would share counters): the model routes one layer at a time, on one stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.router.kernel import _gemm_softmax_topk_kernel, _route_topk_kernel

_MAX_BLOCK = 2048  # elements of logits one program holds

# The router GEMM fused with the softmax top-k up to this many tokens (the model's call site,
# :func:`moelora_dist.moe.router.route_from_hidden`, reads it at each call); 0: never.
FUSED_GEMM_MAX_TOKENS = 64
FUSED_EXPERTS_PER_PROGRAM = 16  # experts of one program (a power of 2; tl.dot: >= 16)
FUSED_BLOCK_H = 128  # hidden columns per step of the GEMM's loop
FUSED_NUM_STAGES = 3  # steps of that loop in flight (cp.async pipelining)
# Programs that split the hidden dim (their fp32 partials summed by the last arriver, in
# order): one program looping over all of H (H / 128 dependent steps) measured 11.2 us at
# T = 1 on an H200 (Qwen3: H 2048, E 128), against 4.9 + 2.3 for cuBLAS and the top-k launch.
FUSED_H_SPLITS = 8
_FUSED_BLOCK_T = 16  # tokens per program (tl.dot's smallest M)
_FUSED_MAX_EXPERTS = 256  # the last arriver holds [16, next_power_of_2(E)] scores
_MIN_COUNTERS = 256  # token blocks the first allocation covers (4096 tokens)

_counters: dict[torch.device, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counters that a captured graph may still use


def _route(logits_TE: torch.Tensor, top_k: int, softmax_first: bool, renormalize: bool):
    T, E = logits_TE.shape
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits_TE.device)
    if T == 0:
        return weights, ids
    block_e = next_power_of_2(E)
    block_t = max(1, min(16, _MAX_BLOCK // block_e, next_power_of_2(T)))
    _route_topk_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, weights, ids, T, E, logits_TE.stride(0), logits_TE.stride(1),
        weights.stride(0), ids.stride(0), TOP_K=top_k, SOFTMAX_FIRST=softmax_first,
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(top_k), num_warps=4 if block_e * block_t >= 1024 else 1)
    return weights, ids


def softmax_topk(router_logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    """See :func:`moelora_dist.kernels.router.naive.softmax_topk`."""
    return _route(router_logits_TE, top_k, True, renormalize)


def topk_softmax(router_logits_TE: torch.Tensor, top_k: int):
    """See :func:`moelora_dist.kernels.router.naive.topk_softmax`."""
    return _route(router_logits_TE, top_k, False, False)


def token_block_counters(device: torch.device, num_blocks: int) -> torch.Tensor | None:
    """The cached int32 counters of ``device`` (all 0 between launches), at least
    ``num_blocks`` of them; None while a CUDA graph is being captured and the cache is too
    small (allocating there would tie the counters to the graph's memory pool)."""
    have = _counters.get(device)
    if have is not None and have.numel() >= num_blocks:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _retired.append(have)
    _counters[device] = torch.zeros(max(num_blocks, _MIN_COUNTERS), dtype=torch.int32,
                                    device=device)
    return _counters[device]


def gemm_softmax_topk(x_TH: torch.Tensor, w_router_EH: torch.Tensor, top_k: int,
                      renormalize: bool, logits_TE: torch.Tensor | None = None):
    """:func:`softmax_topk` of ``F.linear(x_TH, w_router_EH)`` in one launch.

    Args:
        x_TH: ``[T, H]`` bf16 or fp16 activations.
        w_router_EH: ``[E, H]`` router weight in ``x_TH``'s dtype (no bias).
        logits_TE: optional ``[T, E]`` buffer in ``x_TH``'s dtype that receives the logits;
            None: a scratch buffer that is dropped (no caller needs them today).
    Returns:
        ``topk_weights_TK`` fp32 and ``topk_ids_TK`` int32, as :func:`softmax_topk`.

    The logits are the fp32 dot rounded once to ``x_TH``'s dtype, as cuBLAS's bf16 output;
    where the fp32 sums run in another order they may differ from cuBLAS's in the last bit,
    which can swap two experts whose logits are one ulp apart. More than 256 experts, or a
    capture that would have to allocate counters, take the unfused path (``F.linear``, then
    :func:`softmax_topk`)."""
    if x_TH.dim() != 2 or w_router_EH.dim() != 2 or x_TH.shape[1] != w_router_EH.shape[1]:
        raise ValueError(f"x {tuple(x_TH.shape)} and the router weight "
                         f"{tuple(w_router_EH.shape)} must be [T, H] and [E, H]")
    if x_TH.dtype not in (torch.bfloat16, torch.float16) or w_router_EH.dtype != x_TH.dtype:
        raise ValueError(f"x ({x_TH.dtype}) and the router weight ({w_router_EH.dtype}) must "
                         "share one 16-bit dtype")
    (T, H), E = x_TH.shape, w_router_EH.shape[0]
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")
    if logits_TE is not None and (tuple(logits_TE.shape) != (T, E)
                                  or logits_TE.dtype != x_TH.dtype):
        raise ValueError(f"logits buffer {tuple(logits_TE.shape)} {logits_TE.dtype}; expected "
                         f"({T}, {E}) {x_TH.dtype}")
    num_blocks = triton.cdiv(T, _FUSED_BLOCK_T)
    counters = token_block_counters(x_TH.device, num_blocks) if E <= _FUSED_MAX_EXPERTS else None
    if T == 0 or counters is None:
        logits = F.linear(x_TH, w_router_EH)
        return softmax_topk(logits if logits_TE is None else logits_TE.copy_(logits), top_k,
                            renormalize)
    if logits_TE is None:
        logits_TE = torch.empty(T, E, dtype=x_TH.dtype, device=x_TH.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x_TH.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x_TH.device)
    block_c = FUSED_EXPERTS_PER_PROGRAM
    num_chunks = triton.cdiv(E, block_c)
    block_h = FUSED_BLOCK_H
    splits = max(1, min(FUSED_H_SPLITS, triton.cdiv(H, block_h)))
    h_per_split = triton.cdiv(triton.cdiv(H, splits), block_h) * block_h
    splits = triton.cdiv(H, h_per_split)  # every split holds columns
    parts = torch.empty(splits, T, E, dtype=torch.float32, device=x_TH.device)
    _gemm_softmax_topk_kernel[(num_blocks, num_chunks, splits)](
        x_TH, w_router_EH, parts, logits_TE, counters, weights, ids, T, E, H, h_per_split,
        x_TH.stride(0), x_TH.stride(1), w_router_EH.stride(0), w_router_EH.stride(1),
        logits_TE.stride(0), logits_TE.stride(1), weights.stride(0), ids.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, NUM_CHUNKS=num_chunks, H_SPLITS=splits,
        BLOCK_T=_FUSED_BLOCK_T,
        BLOCK_C=block_c, BLOCK_H=FUSED_BLOCK_H, BLOCK_E=next_power_of_2(E),
        BLOCK_K=next_power_of_2(top_k), num_warps=4,
        num_stages=FUSED_NUM_STAGES)
    return weights, ids
