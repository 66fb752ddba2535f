"""Routing: router logits -> top-k experts and weights, and global -> local expert ids.

Legend: T tokens, E experts, K top-k, G expert groups.

Three routers, each the exact op sequence of its transformers 5 module (on CUDA the first and
the third are one Triton launch, :mod:`moelora_dist.kernels.router`; among equal scores it
takes the lowest expert ids, the set ``torch.topk``'s CUDA gather takes, and a GPU test pins
the two together):

- ``softmax`` (Qwen3-MoE, Mixtral, OLMoE): softmax in fp32, top-k, optional renormalization;
- ``sigmoid_grouped`` (DeepSeek-V3, Kimi-K2, GLM-4.5; ``*TopkRouter``): sigmoid scores in
  fp32; the correction bias is added for the *choice* only; a group's score is the sum of its
  two best choice values over ``E / G`` contiguous experts; the best ``topk_group`` groups
  stay, and the top-k choice values inside them pick the experts; the weights are the
  *unbiased* scores of the chosen experts, divided by their sum (+1e-20) when
  ``renormalize``, then multiplied by ``routed_scaling_factor``;
- ``topk_softmax`` (gpt-oss ``GptOssTopKRouter``): top-k of the logits (a bias is part of the
  logits), then a softmax over the k chosen only.

Every function runs on the device with fixed shapes and no host sync, so it can be captured in
a CUDA graph. Plain-loop references of the same math: :mod:`.router_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.kernels.router import naive as router_naive

ROUTERS = ("softmax", "sigmoid_grouped", "topk_softmax")


@dataclass(frozen=True)
class RouterSpec:
    """Which router and its constants (:data:`ROUTERS`; see the module docstring)."""

    top_k: int
    kind: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROUTERS:
            raise ValueError(f"unknown router {self.kind!r}; pick one of {ROUTERS}")


# False: the PyTorch op sequence on CUDA too (A/B runs: benchmarks/device/with_constants.py).
TRITON_TOPK = True


def _topk_kernels(router_logits_TE: torch.Tensor):
    """The top-k router family for these logits: its one-launch Triton path on CUDA (the
    rule of :func:`~moelora_dist.moe.experts.pick_backend`), the reference elsewhere."""
    if router_logits_TE.is_cuda and TRITON_TOPK:
        from moelora_dist.kernels.router import ops  # Triton: optional off x86 Linux

        return ops
    return router_naive


def route(router_logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax in fp32, then top-k, as HF Qwen3-MoE / Mixtral / OLMoE do.

    Returns ``topk_weights_TK`` (fp32) and ``topk_ids_TK`` (int32, global expert ids).
    ``renormalize`` is Mixtral's behaviour and Qwen3-MoE's ``norm_topk_prob``.
    On CUDA one Triton launch (:mod:`moelora_dist.kernels.router`; equal scores: the lowest
    expert id first), else the op sequence of transformers.
    """
    if top_k > router_logits_TE.shape[-1]:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {router_logits_TE.shape[-1]}")
    return _topk_kernels(router_logits_TE).softmax_topk(router_logits_TE, top_k, renormalize)


def route_sigmoid_grouped(router_logits_TE: torch.Tensor, correction_bias_E: torch.Tensor,
                          top_k: int, n_group: int, topk_group: int, renormalize: bool,
                          scaling: float):
    """DeepSeek-V3 / GLM-4.5 routing (module docstring).

    Args:
        router_logits_TE: ``[T, E]`` logits (computed in fp32 by the caller, as HF does).
        correction_bias_E: ``[E]`` fp32 ``e_score_correction_bias``: chooses, never weighs.
    Returns:
        ``topk_weights_TK`` fp32 and ``topk_ids_TK`` int32.
    """
    T, E = router_logits_TE.shape
    scores_TE = router_logits_TE.float().sigmoid()
    choice_TE = scores_TE + correction_bias_E.float()
    group_scores_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
    score_mask_TE = group_mask_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice_TE = choice_TE.masked_fill(~score_mask_TE.bool(), float("-inf"))
    topk_ids_TK = torch.topk(choice_TE, k=top_k, dim=-1, sorted=False)[1]
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if renormalize:
        topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights_TK * scaling, topk_ids_TK.to(torch.int32)


def route_topk_softmax(router_logits_TE: torch.Tensor, top_k: int):
    """gpt-oss routing: top-k of the logits, softmax over those k (in the logits' dtype, as
    HF; returned as fp32). ``[T, E]`` -> ``topk_weights_TK`` fp32, ``topk_ids_TK`` int32.
    On CUDA one Triton launch, as :func:`route`."""
    if top_k > router_logits_TE.shape[-1]:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {router_logits_TE.shape[-1]}")
    return _topk_kernels(router_logits_TE).topk_softmax(router_logits_TE, top_k)


def route_with(spec: RouterSpec, router_logits_TE: torch.Tensor,
               correction_bias_E: torch.Tensor | None = None):
    """Dispatch to the router of ``spec``; returns ``(topk_weights_TK fp32, topk_ids_TK
    int32)``. ``correction_bias_E`` is required by ``sigmoid_grouped`` only."""
    if spec.kind == "softmax":
        return route(router_logits_TE, spec.top_k, spec.renormalize)
    if spec.kind == "topk_softmax":
        return route_topk_softmax(router_logits_TE, spec.top_k)
    if correction_bias_E is None:
        raise ValueError("the sigmoid_grouped router needs its correction bias")
    return route_sigmoid_grouped(router_logits_TE, correction_bias_E, spec.top_k, spec.n_group,
                                 spec.topk_group, spec.renormalize, spec.scaling)


def localize_topk_ids(topk_ids: torch.Tensor, expert_start, num_local: int,
                      num_experts: int | None = None) -> torch.Tensor:
    """Global expert ids -> local ids of the rank owning ``[expert_start, + num_local)``;
    experts owned elsewhere (and the sentinel ``-1``) become ``-1``.

    ``expert_start`` is an int, or a tensor that broadcasts against ``topk_ids`` (e.g.
    ``[P, 1, 1]`` start of every EP rank, to localize for all destinations at once).
    ``num_experts``: E, when known; a rank that owns all of them gets int32 ``topk_ids``
    back as they are (the map is the identity on ``[-1, E)``: no launch, which a decode step
    of one GPU pays per layer otherwise). Returns int32 of the broadcast shape.
    """
    if (num_experts is not None and isinstance(expert_start, int) and expert_start == 0
            and num_local >= num_experts and topk_ids.dtype == torch.int32):
        return topk_ids
    local = topk_ids - expert_start  # -1 - start < 0: the sentinel stays unowned
    owned = (local >= 0) & (local < num_local)
    return torch.where(owned, local, -1).to(torch.int32)
