"""Plain-PyTorch reference of one MoE layer with multi-LoRA, readable as DESIGN section 1.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, K top-k, S slots,
R max rank. This is the ground truth every fast path is tested against; it favours clarity
over speed (a loop over experts, masks for slots). It computes in float32, or float64 when
``x`` is float64, and returns ``x.dtype``.

Sentinels: ``topk_ids == -1`` (expert not on this rank, or padding) contributes nothing;
``token_slot == -1`` (base model only) gets no LoRA delta. Neither is ever used as an index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora_dist.lora.buffers import MoELoRABuffers

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
}


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


def localize_topk_ids(topk_ids_TK: torch.Tensor, expert_start: int, num_local: int) -> torch.Tensor:
    """Global expert ids -> local ids on this rank; experts owned elsewhere become -1."""
    local = topk_ids_TK.long() - expert_start
    owned = (topk_ids_TK >= 0) & (local >= 0) & (local < num_local)
    return torch.where(owned, local, torch.full_like(local, -1)).to(torch.int32)


def _lora_slot_view(lora: MoELoRABuffers, slot: int, expert: int, compute_dtype):
    """The four factors of one (slot, expert), shared-outer ones read at expert 0."""
    ea = 0 if bool(lora.gate_up_a_shared[slot]) else expert
    eb = 0 if bool(lora.down_b_shared[slot]) else expert
    return (
        lora.gate_up_a[slot, ea].to(compute_dtype),  # [2R, H]
        lora.gate_up_b[slot, expert].to(compute_dtype),  # [2I_l, R]
        lora.down_a[slot, expert].to(compute_dtype),  # [R, I_l]
        lora.down_b[slot, eb].to(compute_dtype),  # [H, R]
    )


def experts_reference(
    x_TH: torch.Tensor,
    w_gate_up_EXH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    token_slot_T: torch.Tensor | None = None,
    lora: MoELoRABuffers | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Local experts with per-token LoRA, weighted by top-k; partial over MoE-TP shards.

    Args:
        x_TH: ``[T, H]`` tokens.
        w_gate_up_EXH: ``[E_l, 2*I_l, H]`` base gate rows then up rows.
        w_down_EHI: ``[E_l, H, I_l]`` base down projection.
        topk_weights_TK: ``[T, K]`` fp32 routing weights.
        topk_ids_TK: ``[T, K]`` int32 local expert ids, ``-1`` = skip.
        token_slot_T: ``[T]`` int32 adapter slot per token, ``-1`` = no adapter.
        lora: the layer's pool buffers (scaling folded into B), or None for base only.
    Returns:
        ``[T, H]`` in ``x_TH.dtype``: sum over k of weight * expert output (with LoRA delta).
    """
    compute = torch.float64 if x_TH.dtype == torch.float64 else torch.float32
    act = ACTIVATIONS[activation]
    T, H = x_TH.shape
    num_local, two_i, _ = w_gate_up_EXH.shape
    i_local = two_i // 2
    x = x_TH.to(compute)
    y_TH = torch.zeros(T, H, dtype=compute, device=x_TH.device)
    if token_slot_T is None:
        token_slot_T = torch.full((T,), -1, dtype=torch.int32, device=x_TH.device)
    R = lora.max_rank if lora is not None else 0

    for e in range(num_local):
        hit_TK = topk_ids_TK == e
        tokens = hit_TK.any(dim=1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        weight_t = (topk_weights_TK.to(compute) * hit_TK.to(compute)).sum(dim=1)[tokens]
        xe = x[tokens]  # [n, H]
        gate_up = xe @ w_gate_up_EXH[e].to(compute).T  # [n, 2I_l]
        slots = token_slot_T[tokens]
        if lora is not None:
            for s in torch.unique(slots).tolist():
                if s < 0:
                    continue
                rows = (slots == s).nonzero().flatten()
                a_gu, b_gu, _, _ = _lora_slot_view(lora, s, e, compute)
                shrink = xe[rows] @ a_gu.T  # [m, 2R]
                delta = torch.cat(
                    [shrink[:, :R] @ b_gu[:i_local].T, shrink[:, R:] @ b_gu[i_local:].T], dim=1
                )
                gate_up[rows] += delta
        h = act(gate_up[:, :i_local]) * gate_up[:, i_local:]  # [n, I_l]
        out = h @ w_down_EHI[e].to(compute).T  # [n, H]
        if lora is not None:
            for s in torch.unique(slots).tolist():
                if s < 0:
                    continue
                rows = (slots == s).nonzero().flatten()
                _, _, a_d, b_d = _lora_slot_view(lora, s, e, compute)
                out[rows] += (h[rows] @ a_d.T) @ b_d.T
        y_TH.index_add_(0, tokens, weight_t[:, None] * out)
    return y_TH.to(x_TH.dtype)
