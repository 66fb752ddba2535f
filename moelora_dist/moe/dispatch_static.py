"""Fixed-capacity all-to-all dispatcher: no split exchange, no host sync, CUDA-graph safe.

Legend: T tokens, H hidden, K top-k, P EP degree, C = ceil(T / P) tokens per share.

The same token shares as :mod:`moelora_dist.moe.dispatch_a2a` (share ``e`` of the EP group
goes with EP rank ``e``; MoE-TP peers take the same share), but every rank sends every share
token to every EP rank, in one ``all_to_all_single`` with even splits of ``C`` rows. A row
that the destination does not need carries expert ids ``-1`` only, so the expert kernels skip
it (the sentinel bucket) and it returns zeros. Shapes depend on ``T`` alone.

Why: the split exchange of the uneven all-to-all costs a collective, a host read-back and
the launches around it (about 1 ms on two H200s, see ``benchmarks/results``). With top-8 of
128 experts on two EP ranks, 99.7% of the tokens need both ranks anyway, so the padding is
almost free; with top-2 of 8 experts on two ranks about 21% of the rows are padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch import Dispatched, Dispatcher
from moelora_dist.moe.dispatch_a2a import _ALL_GATHER_SINGLE, _meta_pad, _row_layout, _unpack
from moelora_dist.parallel.groups import group_size


class AllToAllStaticDispatcher(Dispatcher):
    """Even-split all-to-all of ``P x C`` rows per rank; see the module docstring."""

    name = "all_to_all_static"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Dispatched:
        g = self.groups
        P, e_local = g.ep_size, self.shard.num_local_experts
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        C = -(-T // P)
        me = g.rank_layout.moe_ep_rank
        dev = x_TH.device
        start, end = min(T, me * C), min(T, (me + 1) * C)
        n = end - start
        # Pad the share to C rows: padded rows route nowhere (ids -1).
        ids_CK = torch.full((C, K), -1, dtype=torch.int32, device=dev)
        ids_CK[:n] = topk_ids_TK[start:end]
        w_CK = torch.zeros(C, K, dtype=torch.float32, device=dev)
        w_CK[:n] = topk_weights_TK[start:end]
        slot_C = torch.full((C,), -1, dtype=torch.int32, device=dev)
        if token_slot_T is not None:
            slot_C[:n] = token_slot_T[start:end]
        dest_P11 = torch.arange(P, device=dev, dtype=torch.int32).view(P, 1, 1)
        local_PCK = ids_CK.unsqueeze(0) - dest_P11 * e_local
        local_PCK = torch.where((ids_CK >= 0) & (local_PCK >= 0) & (local_PCK < e_local),
                                local_PCK, -1)
        meta = [w_CK.view(torch.int32).expand(P, C, K), local_PCK,
                slot_C.view(1, C, 1).expand(P, C, 1)]
        pad = _meta_pad(K)
        if pad:
            meta.append(torch.zeros(1, 1, pad, dtype=torch.int32, device=dev).expand(P, C, pad))
        meta_PCW = torch.cat(meta, dim=2)
        # Write the rows in place: meta words, then x broadcast to the P destinations in one
        # pass (no padded copy of the share, no P-fold copy before packing).
        x_off, row = _row_layout(H, K, x_TH.dtype)
        xb = H * x_TH.dtype.itemsize
        send_PCR = torch.empty(P, C, row, dtype=torch.uint8, device=dev)
        send_PCR[:, :, :x_off] = meta_PCW.view(torch.uint8)
        send_PCR[:, :n, x_off:x_off + xb] = x_TH[start:end].contiguous().view(torch.uint8)
        if n < C:
            send_PCR[:, n:, x_off:] = 0
        if row > x_off + xb:
            send_PCR[:, :n, x_off + xb:] = 0
        send = send_PCR.view(P * C, row)
        recv = torch.empty_like(send)
        if P > 1:
            dist.all_to_all_single(recv, send, group=g.ep_group)
        else:
            recv = send
        x_NH, w_NK, ids_NK, slot_N = _unpack(recv, H, K, x_TH.dtype)
        return Dispatched(x_NH, w_NK, ids_NK, slot_N if token_slot_T is not None else None,
                          (T, C, n))

    def combine(self, y_NH: torch.Tensor, dispatched: Dispatched, *,
                gather: bool = True) -> torch.Tensor:
        """``y_NH [P*C, H]`` -> ``[T, H]`` on every TP rank (``gather=False``: the share)."""
        g = self.groups
        T, C, n = dispatched.handle
        P, H = g.ep_size, y_NH.shape[1]
        back = torch.empty_like(y_NH)
        if P > 1:
            dist.all_to_all_single(back, y_NH.contiguous(), group=g.ep_group)
        else:
            back = y_NH
        # Sum of the P copies: PyTorch accumulates half types in fp32 and rounds once.
        y_CH = back.view(P, C, H).sum(dim=0)
        if group_size(g.moe_tp_group) > 1:
            dist.all_reduce(y_CH, group=g.moe_tp_group)
        if not gather:
            return y_CH[:n]
        if P == 1:
            return y_CH[:T]
        out = y_CH.new_empty(P * C, H)
        _ALL_GATHER_SINGLE(out, y_CH, group=g.ep_group)
        return out[:T]
