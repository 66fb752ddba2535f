"""Host glue of the top-k routers: the Triton path of :mod:`.naive`, one launch per call
(the reference is six: the fp32 cast, softmax, the top-k's select and sort, the sum and the
division of the renormalization, the int32 cast). No host sync; CUDA-graph safe."""

from __future__ import annotations

import torch
import triton

from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.router.kernel import _route_topk_kernel

_MAX_BLOCK = 2048  # elements of logits one program holds


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
