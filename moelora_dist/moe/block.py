"""The base MoE block: one rank's slice of a MoE layer's weights, and its routing.

Legend: T tokens, H hidden, E experts, E_l local experts, I intermediate, I_l local
intermediate, X = 2 I_l (the rank's gate rows, then its up rows), K top-k.

``MoEBlock`` holds the router ``[E, H]`` replicated, gate and up rows ``[E_l, X, H]`` and down
columns ``[E_l, H, I_l]`` (docs/design.md, the rank layout). It has no LoRA and no collective;
:class:`moelora_dist.moe.layer.LoRAMoE` wraps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora_dist.kernels.constants import check_activation
from moelora_dist.kernels.weights_fp8 import is_fp8
from moelora_dist.moe.experts import pick_backend, run_experts
from moelora_dist.moe.router import localize_topk_ids, route
from moelora_dist.parallel.layout import MoEShard
from moelora_dist.parallel.sharding import cut_gate_up


class MoEBlock(nn.Module):
    """Base MoE layer holding one rank's slice of the expert weights (no LoRA, no collectives).

    ``router_EH [E, H]``, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]``: tensors, or
    :class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight` for FP8 experts.
    """

    def __init__(self, router_EH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 *, top_k: int, renormalize: bool, shard: MoEShard, activation: str = "silu"):
        super().__init__()
        E, H = router_EH.shape
        check_activation(activation)
        if E != shard.num_experts:
            raise ValueError(f"router has {E} experts but the shard says {shard.num_experts}")
        want_gu = (shard.num_local_experts, 2 * shard.i_local, H)
        want_d = (shard.num_local_experts, H, shard.i_local)
        if tuple(w_gate_up.shape) != want_gu or tuple(w_down.shape) != want_d:
            raise ValueError(f"rank-local weights have shapes gate_up {tuple(w_gate_up.shape)}, "
                             f"down {tuple(w_down.shape)}; expected {want_gu} and {want_d}")
        if not 0 < top_k <= E:
            raise ValueError(f"top_k={top_k} must be in [1, {E}]")
        self.router = nn.Parameter(router_EH, requires_grad=False)
        # FP8 experts (a BlockFP8Weight: e4m3 values + block scales) are kept as they are.
        self.w_gate_up = w_gate_up if is_fp8(w_gate_up) else nn.Parameter(w_gate_up,
                                                                           requires_grad=False)
        self.w_down = w_down if is_fp8(w_down) else nn.Parameter(w_down, requires_grad=False)
        self.top_k = top_k
        self.renormalize = renormalize
        self.activation = activation
        self.shard = shard

    @classmethod
    def from_full(cls, router_EH: torch.Tensor, w_gate_up_EXH: torch.Tensor,
                  w_down_EHI: torch.Tensor, *, top_k: int, renormalize: bool, shard: MoEShard,
                  activation: str = "silu") -> "MoEBlock":
        """Cut a rank's slice from full weights ``[E, 2I, H]`` / ``[E, H, I]``.

        Gate rows ``[0, I)`` and up rows ``[I, 2I)`` are sliced *separately* by the shard's
        ``I`` range, so each rank gets matching gate and up rows.
        """
        E, two_i, H = w_gate_up_EXH.shape
        I = two_i // 2
        if I != shard.intermediate or tuple(w_down_EHI.shape) != (E, H, I):
            raise ValueError(f"full weights gate_up {tuple(w_gate_up_EXH.shape)} / down "
                             f"{tuple(w_down_EHI.shape)} do not match the shard (E="
                             f"{shard.num_experts}, I={shard.intermediate})")
        experts, i_cols = shard.expert_slice, shard.i_slice
        gate_up = cut_gate_up(w_gate_up_EXH[experts], shard, dim=1)
        down = w_down_EHI[experts, :, i_cols]
        return cls(router_EH.contiguous(), gate_up.contiguous(), down.contiguous(), top_k=top_k,
                   renormalize=renormalize, shard=shard, activation=activation)

    @property
    def num_experts(self) -> int:
        return self.shard.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.shard.num_local_experts

    @property
    def hidden_size(self) -> int:
        return int(self.router.shape[1])

    @property
    def intermediate_size(self) -> int:
        return self.shard.intermediate

    def route(self, x_TH: torch.Tensor):
        """``x_TH [T, H]`` -> ``topk_weights_TK`` fp32, ``topk_ids_TK`` int32 (global ids)."""
        logits_TE = F.linear(x_TH, self.router.to(x_TH.dtype))
        return route(logits_TE, self.top_k, self.renormalize)

    def forward(self, x_TH: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """This rank's partial output ``[T, H]``: its experts, its ``I`` slice, no collective
        and no LoRA. On one process it is the layer's output; over ranks the partials sum to
        it."""
        w_TK, ids_TK = self.route(x_TH)
        local_TK = localize_topk_ids(ids_TK, self.shard.expert_start, self.num_local_experts)
        return run_experts(pick_backend(x_TH.device, backend), x_TH, self.w_gate_up,
                           self.w_down, w_TK, local_TK, None, None, self.activation, None, None)
