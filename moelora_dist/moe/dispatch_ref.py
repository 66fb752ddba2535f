"""Plain ``torch.distributed`` references of the two dispatchers (DeepEP ``refs.py`` style).

Legend: T tokens, H hidden, K top-k, P EP degree.

Obviously correct, slow on purpose: only ``all_gather`` (list form) and local sums in a fixed
rank order, no split bookkeeping, no byte packing. The fast dispatchers are tested against
these on every layout; both references are tested against the single-process layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch import Dispatcher, ExpertFn
from moelora_dist.moe.dispatch_a2a import share_bounds
from moelora_dist.moe.reference import localize_topk_ids
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

    def __call__(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T,
                 expert_fn: ExpertFn) -> torch.Tensor:
        local_TK = localize_topk_ids(topk_ids_TK, self.shard.expert_start,
                                     self.shard.num_local_experts)
        partial_TH = expert_fn(x_TH, topk_weights_TK, local_TK, token_slot_T)
        return sum_in_rank_order(gather_list(partial_TH, self.groups.tp_group), x_TH.dtype)


class ReferenceAllToAll(Dispatcher):
    """The all-to-all's semantics with gathers: shares over EP, partials back, MoE-TP sum.

    Each EP rank keeps only its token share, gathers every peer's share (so it sees the
    tokens an all-to-all would send it, and more), computes its experts on all of them,
    gathers the partials so that each rank sums the ones for its own share, sums over
    MoE-TP, and gathers the shares back into ``[T, H]``.
    """

    name = "ref_all_to_all"

    def __call__(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T,
                 expert_fn: ExpertFn) -> torch.Tensor:
        g = self.groups
        ep, me = g.ep_size, g.rank_layout.moe_ep_rank
        T, H = x_TH.shape
        chunk = -(-T // ep)
        slot_T = token_slot_T if token_slot_T is not None else torch.full(
            (T,), -1, dtype=torch.int32, device=x_TH.device)

        def padded_share(t: torch.Tensor, fill) -> torch.Tensor:
            start, end = share_bounds(T, ep, me)
            out = torch.full((chunk, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: end - start] = t[start:end]
            return out

        # Padding rows carry expert -1 so that they produce zeros.
        shares = [gather_list(padded_share(t, fill), g.ep_group) for t, fill in (
            (x_TH, 0), (topk_weights_TK, 0), (topk_ids_TK, -1), (slot_T, -1))]
        partials = []
        for x_c, w_c, ids_c, slot_c in zip(*shares):
            local = localize_topk_ids(ids_c, self.shard.expert_start,
                                      self.shard.num_local_experts)
            partials.append(expert_fn(x_c, w_c, local,
                                      slot_c if token_slot_T is not None else None))
        # gathered[p][q]: EP rank p's partial for share q; this rank sums column `me`.
        gathered = gather_list(torch.stack(partials), g.ep_group)
        mine = sum_in_rank_order([gp[me] for gp in gathered], x_TH.dtype)
        mine = sum_in_rank_order(gather_list(mine, g.moe_tp_group), x_TH.dtype)
        full = torch.cat(gather_list(mine, g.ep_group))
        return full[:T]
