"""Reference of the top-k routers (also the CPU path); same signatures as ``ops.py``.

Legend: T tokens, E experts, K top-k. Each function is the op sequence of its transformers 5
module, so that ties at the top-k boundary are broken as transformers breaks them there
(``torch.topk``).
"""

from __future__ import annotations

import torch


def softmax_topk(router_logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax in fp32, then top-k, optionally renormalized (Qwen3-MoE ``norm_topk_prob``,
    Mixtral). Returns ``topk_weights_TK`` fp32 and ``topk_ids_TK`` int32."""
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_weights_TK, topk_ids_TK.to(torch.int32)


def topk_softmax(router_logits_TE: torch.Tensor, top_k: int):
    """gpt-oss: top-k of the logits, then a softmax over those k in the logits' dtype (as
    transformers), returned as fp32, with int32 ids."""
    top_TK, topk_ids_TK = torch.topk(router_logits_TE, top_k, dim=-1)
    weights_TK = torch.softmax(top_TK, dim=1, dtype=top_TK.dtype)
    return weights_TK.float(), topk_ids_TK.to(torch.int32)
