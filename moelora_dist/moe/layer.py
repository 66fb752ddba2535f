"""The base MoE block with rank-local weights, and the LoRA MoE layer that wraps it.

Legend: T tokens, H hidden, E experts, E_l local experts, I intermediate, I_l local
intermediate, K top-k, S slots.

``MoEBlock`` holds one rank's slice (DESIGN section 2): the router ``[E, H]`` replicated, gate
and up rows ``[E_l, 2*I_l, H]`` (the rank's gate rows, then its up rows) and down columns
``[E_l, H, I_l]``. ``LoRAMoE`` is the drop-in layer a model calls::

    layer = LoRAMoE(MoEBlock.from_full(...), pool, layer_idx, groups, dispatcher="auto")
    y_TH = layer(x_TH, batch_info)          # full output on every TP rank

forward = route -> dispatch -> local experts with multi-LoRA -> combine. It is the same class
on one process (``ParallelGroups.single()``) and on any ``EP x MoE-TP`` layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.moe.dispatch import (DISPATCHERS, Dispatcher, auto_dispatcher_name,
                                       make_dispatcher)
from moelora_dist.moe.experts import fused_experts
from moelora_dist.moe.reference import ACTIVATIONS, localize_topk_ids, route
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import MoEShard


class MoEBlock(nn.Module):
    """Base MoE layer holding one rank's slice of the expert weights (no LoRA, no collectives).

    ``router_EH [E, H]``, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]``.
    """

    def __init__(self, router_EH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 *, top_k: int, renormalize: bool, shard: MoEShard, activation: str = "silu"):
        super().__init__()
        E, H = router_EH.shape
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; pick one of {list(ACTIVATIONS)}")
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
        self.w_gate_up = nn.Parameter(w_gate_up, requires_grad=False)
        self.w_down = nn.Parameter(w_down, requires_grad=False)
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
        e0, e1, i0, i1 = shard.expert_start, shard.expert_end, shard.i_start, shard.i_end
        gate_up = torch.cat([w_gate_up_EXH[e0:e1, i0:i1], w_gate_up_EXH[e0:e1, I + i0:I + i1]], 1)
        down = w_down_EHI[e0:e1, :, i0:i1]
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

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """This rank's partial output ``[T, H]``: its experts, its ``I`` slice, no collective.

        On one process it is the layer's output; over ranks the partials sum to it.
        """
        w_TK, ids_TK = self.route(x_TH)
        local_TK = localize_topk_ids(ids_TK, self.shard.expert_start, self.num_local_experts)
        return fused_experts(x_TH, self.w_gate_up, self.w_down, w_TK, local_TK,
                             activation=self.activation)


class LoRAMoE(nn.Module):
    """Multi-LoRA MoE layer over any layout; a drop-in replacement for its base layer.

    ``pool`` is a :class:`~moelora_dist.lora.pool.LoRAPool` (anything with
    ``moe_buffers(layer_idx) -> MoELoRABuffers``) or None for base only. ``dispatcher`` is
    one of :data:`~moelora_dist.moe.dispatch.DISPATCHERS`. Attributes it does not define are
    read from ``base`` (config, sizes, quantization method, ...).
    """

    def __init__(self, base: MoEBlock, pool, layer_idx: int, groups: ParallelGroups,
                 dispatcher: str = "auto"):
        super().__init__()
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"unknown dispatcher {dispatcher!r}; pick one of {DISPATCHERS}")
        want = groups.rank_layout.moe_shard(base.shard.num_experts, base.shard.intermediate)
        if want != base.shard:
            raise ValueError(f"base layer holds shard {base.shard} but rank {groups.rank} of "
                             f"{groups.layout} owns {want}; build it with this rank's shard")
        self.base = base
        self.pool = pool
        self.layer_idx = layer_idx
        self.groups = groups
        self.dispatcher = dispatcher
        self._dispatchers: dict[str, Dispatcher] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def get_dispatcher(self, num_tokens: int) -> Dispatcher:
        """The dispatcher used for a batch of ``num_tokens`` tokens (``auto`` resolved)."""
        name = self.dispatcher
        if name == "auto":
            name = auto_dispatcher_name(num_tokens, self.groups.ep_size)
        if name not in self._dispatchers:
            self._dispatchers[name] = make_dispatcher(name, self.groups, self.base.shard)
        return self._dispatchers[name]

    def forward(self, x_TH: torch.Tensor, batch_info: BatchInfo | None = None) -> torch.Tensor:
        """``x_TH [T, H]`` (the same on every TP rank) -> ``y_TH [T, H]`` in ``x_TH.dtype``.

        ``batch_info.token_slot_T [T]`` int32 gives each token's adapter slot (``-1`` = base
        model only); with no LoRA token (or no pool) the LoRA path is skipped entirely.
        """
        if x_TH.dim() != 2 or x_TH.shape[1] != self.base.hidden_size:
            raise ValueError(f"x must be [T, {self.base.hidden_size}], got {tuple(x_TH.shape)}")
        lora = token_slot_T = slot_enabled_S = num_lora_tokens = None
        if batch_info is not None and self.pool is not None and batch_info.any_lora():
            if batch_info.num_tokens != x_TH.shape[0]:
                raise ValueError(f"batch_info describes {batch_info.num_tokens} tokens but x "
                                 f"has {x_TH.shape[0]}; build it for this batch")
            lora = self.pool.moe_buffers(self.layer_idx)
            token_slot_T = batch_info.token_slot_T
            slot_enabled_S = batch_info.slot_enabled_S
            # Known on the host (or None): no per-layer sync to find out whether LoRA runs.
            num_lora_tokens = batch_info.num_lora_tokens
        base = self.base
        w_TK, ids_TK = base.route(x_TH)

        def local_experts(x_NH, w_NK, ids_NK, slot_N):
            if x_NH.shape[0] == 0:
                return x_NH.new_zeros(0, x_NH.shape[1])
            # The all-to-all hands over strided views into its byte buffer; the Triton
            # kernels index their inputs as dense row-major (an illegal access otherwise).
            x_NH, w_NK, ids_NK = x_NH.contiguous(), w_NK.contiguous(), ids_NK.contiguous()
            slot_N = slot_N.contiguous() if slot_N is not None else None
            return fused_experts(x_NH, base.w_gate_up, base.w_down, w_NK, ids_NK, slot_N,
                                 lora if slot_N is not None else None, base.activation,
                                 slot_enabled_S, num_lora_tokens=num_lora_tokens)

        return self.get_dispatcher(x_TH.shape[0])(x_TH, w_TK, ids_TK, token_slot_T,
                                                  local_experts)
