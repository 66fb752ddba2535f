"""Plain ``torch.distributed`` references of the two dispatchers (DeepEP ``refs.py`` style).

Legend: T tokens, H hidden, K top-k, P EP degree, C = ceil(T / P) tokens per share.

Obviously correct, slow on purpose: only ``all_gather`` (list form) and local sums in a fixed
rank order, no split bookkeeping, no byte packing. The fast dispatchers are tested against
these on every layout; both references are tested against the single-process layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.dispatch.packing import share_bounds
from moelora_dist.moe.router import localize_topk_ids
from moelora_dist.parallel.groups import group_size


def gather_list(t: torch.Tensor, group) -> list[torch.Tensor]:
    """``all_gather`` of equally shaped tensors; ``[t]`` on a group of one."""
    if group_size(group) == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def sum_in_rank_order(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    total = torch.zeros_like(parts[0], dtype=torch.float64)
    for p in parts:
        total += p.double()
    return total.to(dtype)


class ReferenceAllReduce(Dispatcher):
    """Every TP rank computes its partial on all tokens; all partials are gathered and summed."""

    name = "ref_all_reduce"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        local_TK = localize_topk_ids(topk_ids_TK, self.shard.expert_start,
                                     self.shard.num_local_experts)
        return Routed(x_TH.contiguous(), topk_weights_TK.contiguous(), local_TK, token_slot_T)

    def combine(self, y_NH: torch.Tensor, routed: Routed) -> torch.Tensor:
        return sum_in_rank_order(gather_list(y_NH, self.groups.tp_group), y_NH.dtype)


class ReferenceAllToAll(Dispatcher):
    """The all-to-all's semantics with gathers: shares over EP, partials back, MoE-TP sum.

    Dispatch: each EP rank pads its token share to ``C`` rows and gathers every peer's share,
    so it computes its experts on all ``P * C`` rows (the tokens an all-to-all would send it,
    and more; padding rows carry expert ``-1``). Combine: the partials are gathered so that
    each rank sums, in rank order, the ones for its own share; then the MoE-TP sum and the
    shares gathered back into ``[T, H]``.
    """

    name = "ref_all_to_all"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        g = self.groups
        ep, me = g.ep_size, g.rank_layout.moe_ep_rank
        T = x_TH.shape[0]
        C = -(-T // ep)
        start, end = share_bounds(T, ep, me)
        slot_T = token_slot_T if token_slot_T is not None else torch.full(
            (T,), -1, dtype=torch.int32, device=x_TH.device)

        def padded_share(t: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((C, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: end - start] = t[start:end]
            return out

        x, w, ids, slot = (torch.cat(gather_list(padded_share(t, fill), g.ep_group))
                           for t, fill in ((x_TH, 0), (topk_weights_TK, 0),
                                           (topk_ids_TK, -1), (slot_T, -1)))
        local = localize_topk_ids(ids, self.shard.expert_start, self.shard.num_local_experts)
        return Routed(x, w, local, slot if token_slot_T is not None else None, (T, C))

    def combine(self, y_NH: torch.Tensor, routed: Routed) -> torch.Tensor:
        g = self.groups
        T, C = routed.state
        ep, me = g.ep_size, g.rank_layout.moe_ep_rank
        partials = y_NH.view(ep, C, y_NH.shape[1])
        # gathered[p][q]: EP rank p's partial for share q; this rank sums column `me`.
        gathered = gather_list(partials, g.ep_group)
        mine = sum_in_rank_order([gp[me] for gp in gathered], y_NH.dtype)
        mine = sum_in_rank_order(gather_list(mine, g.moe_tp_group), y_NH.dtype)
        return torch.cat(gather_list(mine, g.ep_group))[:T]
