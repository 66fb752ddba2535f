"""All-to-all dispatcher: tokens travel over the EP group to the ranks owning their experts.

Legend: T tokens, H hidden, K top-k, P EP degree, n tokens of this rank's share,
S rows sent, N rows received.

Pipeline on the rank at ``(moe_ep_rank = e, moe_tp_rank = m)`` of a TP group:

1. Every TP rank holds all ``T`` tokens. The EP group of column ``m`` splits them into ``P``
   contiguous shares of ``ceil(T / P)`` (:func:`~.packing.share_bounds`); this rank takes
   share ``e`` (empty when ``T < P`` leaves nothing for it). The MoE-TP peers of this rank
   take the same share, because the destination's ``I`` slices are spread over exactly those
   peers' columns.
2. A token is sent once to each EP rank that owns at least one of its ``K`` experts, with its
   routing weights, its ids renumbered to the destination's local experts (``-1`` for the
   others) and its adapter slot, packed into one byte row (:mod:`.packing`), so that a
   single ``all_to_all_single`` moves everything. Send counts are exchanged first; the
   receive buffer is sized from them (the dispatch's only host sync).
3. The destination computes its local experts for its ``I`` slice and sends the weighted
   partial sums back with the reversed splits; the origin adds the copies of each token
   (``index_add_`` in the input dtype).
4. ``all_reduce`` over the MoE-TP group sums the ``I`` slices; ``all_gather`` over the EP
   group puts the shares back together, so every TP rank ends with the full ``[T, H]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.dispatch.packing import (all_gather_shares, all_to_all_rows, meta_row,
                                               pack_rows, share_bounds, unpack_rows)
from moelora_dist.moe.router import localize_topk_ids
from moelora_dist.parallel.groups import group_size


@dataclass
class _State:
    num_tokens: int
    token_idx_S: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    share: tuple[int, int]


class AllToAllDispatcher(Dispatcher):
    """Token movement over the EP group; see the module docstring for the pipeline."""

    name = "all_to_all"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        g = self.groups
        ep, e_local = g.ep_size, self.shard.num_local_experts
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        start, end = share_bounds(T, ep, g.rank_layout.moe_ep_rank)
        ids_nK = topk_ids_TK[start:end]
        n = end - start
        dev = x_TH.device
        dest_P11 = torch.arange(ep, device=dev, dtype=torch.int64).view(ep, 1, 1)
        # ids renumbered to every destination's local experts at once: [P, n, K]
        local_PnK = localize_topk_ids(ids_nK.unsqueeze(0), dest_P11 * e_local, e_local)
        mask_Pn = (local_PnK >= 0).any(dim=2)
        send_counts_P = mask_Pn.sum(dim=1)
        recv_counts_P = torch.empty_like(send_counts_P)
        all_to_all_rows(recv_counts_P, send_counts_P, None, None, g.ep_group)
        counts = torch.cat([send_counts_P, recv_counts_P]).tolist()  # host sync: split sizes
        send_splits, recv_splits = counts[:ep], counts[ep:]
        # (dest, token) pairs sorted by destination, then token: rank d's rows are contiguous.
        dest_S, token_S = mask_Pn.nonzero(as_tuple=True)
        slot_n1 = (token_slot_T[start:end] if token_slot_T is not None
                   else torch.full((n,), -1, dtype=torch.int32, device=dev))[:, None]
        meta_SW = meta_row(topk_weights_TK[start:end], local_PnK, slot_n1)[dest_S, token_S]
        send = pack_rows(meta_SW, x_TH[start:end][token_S])
        recv = send.new_empty(sum(recv_splits), send.shape[1])
        all_to_all_rows(recv, send, recv_splits, send_splits, g.ep_group)
        x_NH, w_NK, ids_NK, slot_N = unpack_rows(recv, H, K, x_TH.dtype)
        state = _State(T, token_S, send_splits, recv_splits, (start, end))
        return Routed(x_NH.contiguous(), w_NK.contiguous(), ids_NK.contiguous(),
                      slot_N.contiguous() if token_slot_T is not None else None, state)

    def combine(self, y_NH: torch.Tensor, routed: Routed, *, gather: bool = True) -> torch.Tensor:
        """``gather=False`` stops before the EP all-gather and returns this rank's share
        ``[end - start, H]`` (for callers whose next op keeps tokens split, and benchmarks)."""
        g, st = self.groups, routed.state
        H = y_NH.shape[1]
        back_SH = y_NH.new_empty(sum(st.send_splits), H)
        all_to_all_rows(back_SH, y_NH.contiguous(), st.send_splits, st.recv_splits, g.ep_group)
        start, end = st.share
        # A token sent to several EP ranks comes back once from each: add the copies. In bf16
        # the sum of two copies rounds once, as the all-reduce dispatcher's sum does.
        y_nH = y_NH.new_zeros(end - start, H)
        y_nH.index_add_(0, st.token_idx_S, back_SH)
        if group_size(g.moe_tp_group) > 1:
            dist.all_reduce(y_nH, group=g.moe_tp_group)
        if not gather:
            return y_nH
        return all_gather_shares(y_nH, st.num_tokens, g.ep_group)
