"""The LoRA MoE layer: a drop-in wrapper of a base MoE block that serves many adapters.

Legend: T tokens, H hidden, N rows this rank computes after dispatch, K top-k, S slots.

    layer = LoRAMoE(MoEBlock.from_full(...), pool, layer_idx, groups, dispatcher="auto")
    y_TH = layer(x_TH, batch_info)          # full output on every TP rank

It is the same class on one process (``ParallelGroups.single()``) and on any ``EP x MoE-TP``
layout, and its forward reads top to bottom: route -> dispatch -> local experts with
multi-LoRA -> combine. What depends only on the layout and the device (the dispatchers, the
expert backend) is decided when the layer is built, not per call.
"""

from __future__ import annotations

import torch
from torch import nn

from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.dispatch import (DISPATCHERS, Dispatcher, auto_dispatcher_name,
                                       make_dispatcher)
from moelora_dist.moe.experts import pick_backend, run_experts
from moelora_dist.moe.dispatch.all_reduce import AllReduceDispatcher
from moelora_dist.parallel.groups import ParallelGroups, group_size


class LoRAMoE(nn.Module):
    """Multi-LoRA MoE layer over any layout; a drop-in replacement for its base layer.

    Args:
        base: this rank's :class:`~moelora_dist.moe.block.MoEBlock`.
        pool: a :class:`~moelora_dist.lora.pool.LoRAPool` (anything with
            ``moe_buffers(layer_idx) -> MoELoRAWeights``), or None for base only.
        dispatcher: one of :data:`~moelora_dist.moe.dispatch.DISPATCHERS`, or a
            :class:`~moelora_dist.moe.dispatch.Dispatcher` built for this rank's shard (one
            with its own settings, e.g. the fixed capacity of ``all_to_all_fixed``).
        backend: ``"torch"`` or ``"triton"`` for the experts; None: by the weights' device.
    Attributes it does not define are read from ``base`` (config, sizes, ...).
    """

    def __init__(self, base: MoEBlock, pool, layer_idx: int, groups: ParallelGroups,
                 dispatcher: str | Dispatcher = "auto", backend: str | None = None):
        super().__init__()
        built = dispatcher if isinstance(dispatcher, Dispatcher) else None
        if built is not None:
            if built.shard != base.shard or built.groups != groups:
                raise ValueError(f"dispatcher {built.name!r} was built for another shard or "
                                 "layout; build it with this layer's groups and shard")
            dispatcher = built.name
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
        self.backend = pick_backend(base.w_gate_up.device, backend)
        names = (["all_reduce", "all_to_all"] if dispatcher == "auto" else [dispatcher])
        self._dispatchers: dict[str, Dispatcher] = {
            n: built or make_dispatcher(n, groups, base.shard) for n in names}

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
        return self._dispatchers[name]

    def forward(self, x_TH: torch.Tensor, batch_info: BatchInfo | None = None,
                router_logits_TE: torch.Tensor | None = None,
                sum_pairs: bool = True) -> torch.Tensor:
        """``x_TH [T, H]`` (the same on every TP rank) -> ``y_TH [T, H]`` in ``x_TH.dtype``.

        ``batch_info.token_slot_T [T]`` int32 gives each token's adapter slot (``-1`` = base
        model only); with no LoRA token (or no pool) the LoRA path is left out entirely.
        ``router_logits_TE``: ``[T, E]`` logits the caller computed (the model adds a router
        LoRA to ``base.router_logits(x)``); None routes from ``x``. ``sum_pairs=False``: where
        the combine has nothing to do (the all-reduce dispatcher over one rank) the Triton
        path returns its pair outputs before the top-k sum
        (:class:`~moelora_dist.kernels.moe_gemm.ops.PairOutputs`), for the caller's next
        kernel to sum; elsewhere the sum as always.
        """
        if x_TH.dim() != 2 or x_TH.shape[1] != self.base.hidden_size:
            raise ValueError(f"x must be [T, {self.base.hidden_size}], got {tuple(x_TH.shape)}")
        lora = token_slot_T = slot_enabled_S = num_lora_tokens = max_rank = None
        if batch_info is not None and self.pool is not None and batch_info.any_lora():
            if batch_info.num_tokens != x_TH.shape[0]:
                raise ValueError(f"batch_info describes {batch_info.num_tokens} tokens but x "
                                 f"has {x_TH.shape[0]}; build it for this batch")
            lora = self.pool.moe_buffers(self.layer_idx)
            token_slot_T = batch_info.token_slot_T
            slot_enabled_S = batch_info.slot_enabled_S
            # Known on the host (or None): no per-layer sync to find out whether LoRA runs.
            num_lora_tokens = batch_info.num_lora_tokens
            max_rank = batch_info.max_rank or None  # rank tiles for the adapters in use
        base = self.base
        topk_weights_TK, topk_ids_TK = base.route(x_TH, router_logits_TE)
        dispatcher = self.get_dispatcher(x_TH.shape[0])
        routed = dispatcher.dispatch(x_TH, topk_weights_TK, topk_ids_TK, token_slot_T)
        local = (not sum_pairs and isinstance(dispatcher, AllReduceDispatcher)
                 and group_size(self.groups.tp_group) == 1)
        y_NH = run_experts(self.backend, routed.x_NH, base.w_gate_up, base.w_down,
                           routed.topk_weights_NK, routed.topk_ids_NK, routed.token_slot_N,
                           lora, base.activation, slot_enabled_S, num_lora_tokens,
                           *base.expert_biases(), max_lora_rank=max_rank,
                           sum_pairs=not local)
        return y_NH if local else dispatcher.combine(y_NH, routed)
