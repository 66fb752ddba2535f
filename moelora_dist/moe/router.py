"""Routing: router logits -> top-k experts and weights, and global -> local expert ids.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch


def route(router_logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax in fp32, then top-k, as HF Qwen3-MoE / Mixtral / OLMoE do.

    Returns ``topk_weights_TK`` (fp32) and ``topk_ids_TK`` (int32, global expert ids).
    ``renormalize`` is Mixtral's behaviour and Qwen3-MoE's ``norm_topk_prob``.
    """
    if top_k > router_logits_TE.shape[-1]:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {router_logits_TE.shape[-1]}")
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_weights_TK, topk_ids_TK.to(torch.int32)


def localize_topk_ids(topk_ids: torch.Tensor, expert_start, num_local: int) -> torch.Tensor:
    """Global expert ids -> local ids of the rank owning ``[expert_start, + num_local)``;
    experts owned elsewhere (and the sentinel ``-1``) become ``-1``.

    ``expert_start`` is an int, or a tensor that broadcasts against ``topk_ids`` (e.g.
    ``[P, 1, 1]`` start of every EP rank, to localize for all destinations at once).
    Returns int32 of the broadcast shape.
    """
    local = topk_ids.long() - expert_start
    owned = (topk_ids >= 0) & (local >= 0) & (local < num_local)
    return torch.where(owned, local, torch.full_like(local, -1)).to(torch.int32)
