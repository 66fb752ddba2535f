"""All-reduce dispatcher: no token movement; combine sums the TP group's partial outputs.

Non-local experts become ``-1``; each rank computes its experts (EP) for its ``I`` slice
(MoE-TP), and one all-reduce over the TP group adds the partials. Every shape is fixed by
``T`` and nothing is read back to the host, so it is captured in CUDA graphs. Best for decode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.router import localize_topk_ids
from moelora_dist.parallel.groups import group_size


class AllReduceDispatcher(Dispatcher):
    name = "all_reduce"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        local_TK = localize_topk_ids(topk_ids_TK, self.shard.expert_start,
                                     self.shard.num_local_experts, self.shard.num_experts)
        return Routed(x_TH.contiguous(), topk_weights_TK.contiguous(), local_TK, token_slot_T)

    def combine(self, y_NH: torch.Tensor, routed: Routed) -> torch.Tensor:
        if group_size(self.groups.tp_group) > 1:
            dist.all_reduce(y_NH, group=self.groups.tp_group)
        return y_NH
