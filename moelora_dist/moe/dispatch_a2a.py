"""All-to-all dispatcher: tokens travel over the EP group to the ranks owning their experts.

Legend: T tokens, H hidden, K top-k, P EP degree, n tokens of this rank's share,
S_send / N rows sent / received.

Pipeline on the rank at ``(moe_ep_rank = e, moe_tp_rank = m)`` of a TP group:

1. Every TP rank holds all ``T`` tokens. The EP group of column ``m`` splits them into ``P``
   contiguous shares of ``ceil(T / P)``; this rank takes share ``e`` (empty when ``T < P``
   leaves nothing for it). The MoE-TP peers of this rank take the same share, because the
   destination's ``I`` slices are spread over exactly those peers' columns.
2. A token is sent once to each EP rank that owns at least one of its ``K`` experts, with its
   routing weights, its ids renumbered to the destination's local experts (``-1`` for the
   others) and its adapter slot, all packed into one byte row so that a single
   ``all_to_all_single`` moves everything. Send counts are exchanged first; the receive
   buffer is sized from them (the dispatch's only host sync).
3. The destination computes its local experts for its ``I`` slice and sends the weighted
   partial sums back with the reversed splits; the origin adds the copies of each token
   (``index_add_`` in the input dtype).
4. ``all_reduce`` over the MoE-TP group sums the ``I`` slices; ``all_gather`` over the EP
   group puts the shares back together, so every TP rank ends with the full ``[T, H]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.moe.dispatch import Dispatched, Dispatcher
from moelora_dist.parallel.groups import group_size


# torch >= 2.13 renamed all_gather_into_tensor; the GPU machine runs 2.11.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                in_splits: list[int], group) -> None:
    if group_size(group) == 1:
        out.copy_(inp)
        return
    dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                           input_split_sizes=in_splits, group=group)


def share_bounds(num_tokens: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """Token range ``[start, end)`` of EP rank ``ep_rank``'s share (may be empty)."""
    chunk = -(-num_tokens // ep)
    start = min(num_tokens, ep_rank * chunk)
    return start, min(num_tokens, start + chunk)


def all_gather_shares(y_nH: torch.Tensor, num_tokens: int, group) -> torch.Tensor:
    """Concatenate every EP rank's share (padded to one chunk) back into ``[T, H]``."""
    ep = group_size(group)
    if ep == 1:
        return y_nH
    chunk = -(-num_tokens // ep)
    padded = y_nH.new_zeros(chunk, y_nH.shape[1])
    padded[: y_nH.shape[0]] = y_nH
    out = y_nH.new_empty(ep * chunk, y_nH.shape[1])
    _ALL_GATHER_SINGLE(out, padded, group=group)
    return out[:num_tokens]


class _Handle:
    __slots__ = ("num_tokens", "token_idx_S", "send_splits", "recv_splits", "share", "dtype")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _row_layout(hidden: int, top_k: int, dtype: torch.dtype) -> tuple[int, int]:
    """(offset of x, row bytes): fp32 weights | int32 ids | int32 slot | pad | x | pad.

    Offsets and the row stride are multiples of 16 bytes, so every part views in place.
    """
    meta = 4 * top_k + 4 * (top_k + 1)
    x_off = -(-meta // 16) * 16
    xb = hidden * dtype.itemsize
    return x_off, x_off + -(-xb // 16) * 16


def _rows(meta_SW: torch.Tensor, x_SH: torch.Tensor) -> torch.Tensor:
    """Byte rows ``meta | x | pad`` from int32 meta words and x (one cat, few launches)."""
    _, row = _row_layout(x_SH.shape[1], 1, x_SH.dtype)
    parts = [meta_SW.view(torch.uint8), x_SH.contiguous().view(torch.uint8)]
    tail = meta_SW.shape[1] * 4 + x_SH.shape[1] * x_SH.element_size()
    tail = -(-tail // 16) * 16 - tail
    if tail:
        parts.append(torch.zeros(x_SH.shape[0], tail, dtype=torch.uint8, device=x_SH.device))
    return torch.cat(parts, dim=1)


def _meta_pad(top_k: int) -> int:
    """int32 words of padding after weights, ids and slot (meta ends on 16 bytes)."""
    return _row_layout(1, top_k, torch.uint8)[0] // 4 - (2 * top_k + 1)


def _pack(x_SH, weights_SK, ids_SK, slot_S) -> torch.Tensor:
    """One byte row per token (see :func:`_row_layout`)."""
    S, K = ids_SK.shape
    meta = [weights_SK.to(torch.float32).contiguous().view(torch.int32),
            ids_SK.to(torch.int32), slot_S.to(torch.int32)[:, None]]
    pad = _meta_pad(K)
    if pad:
        meta.append(torch.zeros(S, pad, dtype=torch.int32, device=x_SH.device))
    return _rows(torch.cat(meta, dim=1), x_SH)


def _unpack(rows: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype):
    x_off, _ = _row_layout(hidden, top_k, dtype)
    xb = hidden * dtype.itemsize
    w = rows[:, :4 * top_k].view(torch.float32)
    meta = rows[:, 4 * top_k:4 * (2 * top_k + 1)].view(torch.int32)
    x = rows[:, x_off:x_off + xb].view(dtype)
    return x, w, meta[:, :top_k], meta[:, top_k]


class AllToAllDispatcher(Dispatcher):
    """Token movement over the EP group; see the module docstring for the pipeline."""

    name = "all_to_all"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Dispatched:
        g = self.groups
        ep, e_local = g.ep_size, self.shard.num_local_experts
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        start, end = share_bounds(T, ep, g.rank_layout.moe_ep_rank)
        ids_nK = topk_ids_TK[start:end].to(torch.int32)
        n = end - start
        dev = x_TH.device
        # floor division keeps the sentinel: -1 // E_l == -1, owned by no rank.
        owner_nK = torch.div(ids_nK, e_local, rounding_mode="floor")
        dest_P11 = torch.arange(ep, device=dev, dtype=torch.int32).view(ep, 1, 1)
        own_PnK = owner_nK.unsqueeze(0) == dest_P11
        mask_Pn = own_PnK.any(dim=2)
        send_counts_P = mask_Pn.sum(dim=1)
        recv_counts_P = torch.empty_like(send_counts_P)
        _all_to_all(recv_counts_P, send_counts_P, [1] * ep, [1] * ep, g.ep_group)
        counts = torch.cat([send_counts_P, recv_counts_P]).tolist()  # host sync: split sizes
        send_splits, recv_splits = counts[:ep], counts[ep:]
        # (dest, token) pairs sorted by destination, then token: rank d's rows are contiguous.
        dest_S, token_S = mask_Pn.nonzero(as_tuple=True)
        # Meta words of every (dest, token) at once, ids renumbered to dest's local experts;
        # then one gather picks the rows to send.
        local_PnK = torch.where(own_PnK, ids_nK.unsqueeze(0) - dest_P11 * e_local, -1)
        slot_n = (token_slot_T[start:end].to(torch.int32) if token_slot_T is not None
                  else torch.full((n,), -1, dtype=torch.int32, device=dev))
        meta = [topk_weights_TK[start:end].to(torch.float32).view(torch.int32).expand(ep, n, K),
                local_PnK.to(torch.int32), slot_n.view(1, n, 1).expand(ep, n, 1)]
        pad = _meta_pad(K)
        if pad:
            meta.append(torch.zeros(1, 1, pad, dtype=torch.int32, device=dev).expand(ep, n, pad))
        meta_SW = torch.cat(meta, dim=2)[dest_S, token_S]
        send = _rows(meta_SW, x_TH[start:end][token_S])
        recv = send.new_empty(sum(recv_splits), send.shape[1])
        _all_to_all(recv, send, recv_splits, send_splits, g.ep_group)
        x_NH, w_NK, ids_NK, slot_N = _unpack(recv, H, K, x_TH.dtype)
        handle = _Handle(num_tokens=T, token_idx_S=token_S, send_splits=send_splits,
                         recv_splits=recv_splits, share=(start, end), dtype=x_TH.dtype)
        return Dispatched(x_NH, w_NK, ids_NK, slot_N if token_slot_T is not None else None,
                          handle)

    def combine(self, y_NH: torch.Tensor, dispatched: Dispatched, *,
                gather: bool = True) -> torch.Tensor:
        """``y_NH [N, H]`` partial outputs of the received rows -> ``[T, H]`` on every TP rank.

        ``gather=False`` stops before the EP all-gather and returns this rank's share
        ``[end - start, H]`` (for callers whose next op keeps tokens split, and benchmarks).
        """
        g, h = self.groups, dispatched.handle
        H = y_NH.shape[1]
        back_SH = y_NH.new_empty(sum(h.send_splits), H)
        _all_to_all(back_SH, y_NH.contiguous(), h.send_splits, h.recv_splits, g.ep_group)
        start, end = h.share
        # A token sent to several EP ranks comes back once from each: add the copies. In bf16
        # the sum of two copies rounds once, as the all-reduce dispatcher's sum does.
        y_nH = y_NH.new_zeros(end - start, H)
        y_nH.index_add_(0, h.token_idx_S, back_SH)
        if group_size(g.moe_tp_group) > 1:
            dist.all_reduce(y_nH, group=g.moe_tp_group)
        if not gather:
            return y_nH
        return all_gather_shares(y_nH, h.num_tokens, g.ep_group)
