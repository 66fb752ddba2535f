"""Fixed-capacity all-to-all dispatcher: no split exchange, no host sync, CUDA-graph safe.

Legend: T tokens, H hidden, K top-k, P EP degree, C = ceil(T / P) tokens per share.

The same token shares as :mod:`.all_to_all` (share ``e`` of the EP group goes with EP rank
``e``; MoE-TP peers take the same share), but every rank sends every share token to every EP
rank, in one ``all_to_all_single`` with even splits of ``C`` rows. A row that the destination
does not need carries expert ids ``-1`` only, so the expert kernels skip it (the sentinel
bucket) and it returns zeros. Shapes depend on ``T`` alone.

Why: the split exchange of the uneven all-to-all costs a collective, a host read-back and
the launches around it (about 1 ms on two H200s, see ``benchmarks/results``). With top-8 of
128 experts on two EP ranks, 99.7% of the tokens need both ranks anyway, so the padding is
almost free; with top-2 of 8 experts on two ranks about 21% of the rows are padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.dispatch.packing import (all_gather_into, all_to_all_rows, meta_row,
                                               row_layout, share_bounds, unpack_rows)
from moelora_dist.moe.router import localize_topk_ids
from moelora_dist.parallel.groups import group_size


class AllToAllStaticDispatcher(Dispatcher):
    """Even-split all-to-all of ``P x C`` rows per rank; see the module docstring."""

    name = "all_to_all_static"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Routed:
        g = self.groups
        P, e_local = g.ep_size, self.shard.num_local_experts
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        C = -(-T // P)
        start, end = share_bounds(T, P, g.rank_layout.moe_ep_rank)
        n = end - start
        dev = x_TH.device
        # Pad the share to C rows: padded rows route nowhere (ids -1).
        ids_CK = torch.full((C, K), -1, dtype=torch.int32, device=dev)
        ids_CK[:n] = topk_ids_TK[start:end]
        w_CK = torch.zeros(C, K, dtype=torch.float32, device=dev)
        w_CK[:n] = topk_weights_TK[start:end]
        slot_C1 = torch.full((C, 1), -1, dtype=torch.int32, device=dev)
        if token_slot_T is not None:
            slot_C1[:n, 0] = token_slot_T[start:end]
        dest_P11 = torch.arange(P, device=dev, dtype=torch.int64).view(P, 1, 1)
        local_PCK = localize_topk_ids(ids_CK.unsqueeze(0), dest_P11 * e_local, e_local)
        meta_PCW = meta_row(w_CK, local_PCK, slot_C1)
        # Write the rows in place: meta words, then x broadcast to the P destinations in one
        # pass (no padded copy of the share, no P-fold copy before packing).
        x_off, row = row_layout(H, K, x_TH.dtype)
        xb = H * x_TH.dtype.itemsize
        send_PCR = torch.empty(P, C, row, dtype=torch.uint8, device=dev)
        send_PCR[:, :, :x_off] = meta_PCW.view(torch.uint8)
        send_PCR[:, :n, x_off:x_off + xb] = x_TH[start:end].contiguous().view(torch.uint8)
        if n < C:
            send_PCR[:, n:, x_off:] = 0
        if row > x_off + xb:
            send_PCR[:, :n, x_off + xb:] = 0
        send = send_PCR.view(P * C, row)
        recv = torch.empty_like(send) if P > 1 else send
        if P > 1:
            all_to_all_rows(recv, send, None, None, g.ep_group)
        x_NH, w_NK, ids_NK, slot_N = unpack_rows(recv, H, K, x_TH.dtype)
        return Routed(x_NH.contiguous(), w_NK.contiguous(), ids_NK.contiguous(),
                      slot_N.contiguous() if token_slot_T is not None else None, (T, C, n))

    def combine(self, y_NH: torch.Tensor, routed: Routed, *, gather: bool = True) -> torch.Tensor:
        """``y_NH [P*C, H]`` -> ``[T, H]`` on every TP rank (``gather=False``: the share)."""
        g = self.groups
        T, C, n = routed.state
        P, H = g.ep_size, y_NH.shape[1]
        back = torch.empty_like(y_NH) if P > 1 else y_NH
        if P > 1:
            all_to_all_rows(back, y_NH.contiguous(), None, None, g.ep_group)
        # Sum of the P copies: PyTorch accumulates half types in fp32 and rounds once.
        y_CH = back.view(P, C, H).sum(dim=0)
        if group_size(g.moe_tp_group) > 1:
            dist.all_reduce(y_CH, group=g.moe_tp_group)
        if not gather:
            return y_CH[:n]
        if P == 1:
            return y_CH[:T]
        out = y_CH.new_empty(P * C, H)
        all_gather_into(out, y_CH, g.ep_group)
        return out[:T]
