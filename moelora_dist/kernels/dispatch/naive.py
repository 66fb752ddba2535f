"""PyTorch references of the dispatch kernels (also the CPU path); ``ops.py`` has the same
signatures. Readable, not fast: loops over destinations, plain indexing.

Legend: n tokens of this rank's share, H hidden, K top-k, P EP degree (destinations),
C capacity (rows per destination), O overflow rows per destination (worst case), N received
rows, B rows of a buffer, W int32 meta words per row. Formats and placement: :mod:`.wire`.

Sentinels: a global expert id ``-1`` (or any id outside ``[0, P * E_l)``) routes the pair
nowhere; a slot ``-1`` travels as ``-1``. Neither is ever used as an index.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.dispatch.wire import (HEADER_OVERFLOW_BIT, DispatchIndex, RowFormat,
                                                back_block, dest_block)


def needs_destination(topk_ids_nK: torch.Tensor, num_local_experts: int,
                      num_dest: int) -> torch.Tensor:
    """``[n, P]`` bool: token ``i`` has at least one expert on destination ``d``."""
    ids = topk_ids_nK.long()
    lo_P = torch.arange(num_dest, device=ids.device) * num_local_experts
    hit_nPK = (ids[:, None, :] >= lo_P[None, :, None]) & (
        ids[:, None, :] < lo_P[None, :, None] + num_local_experts)
    return hit_nPK.any(dim=2)


def dispatch_index(topk_ids_nK: torch.Tensor, num_local_experts: int, num_dest: int,
                   capacity: int, overflow_capacity: int) -> DispatchIndex:
    """Rows of every destination, tokens in order (see :class:`~.wire.DispatchIndex`).

    Args:
        topk_ids_nK: ``[n, K]`` int32 global expert ids of the share (``-1``: none).
        num_local_experts: ``E_l``; destination ``d`` owns experts ``[d E_l, (d + 1) E_l)``.
        capacity: ``C >= 1`` rows per destination in the main exchange.
        overflow_capacity: ``O``: room for rows past ``C`` (``n - C`` covers every case).
    """
    n = topk_ids_nK.shape[0]
    dev = topk_ids_nK.device
    need_nP = needs_destination(topk_ids_nK, num_local_experts, num_dest)
    rank_nP = torch.cumsum(need_nP.to(torch.int64), dim=0) - 1
    pos_nP = torch.where(need_nP, rank_nP, -1).to(torch.int32)
    inv_PC = torch.full((num_dest, capacity), -1, dtype=torch.int32, device=dev)
    ovf_PO = torch.full((num_dest, max(overflow_capacity, 1)), -1, dtype=torch.int32,
                        device=dev)[:, :overflow_capacity]
    tokens = torch.arange(n, dtype=torch.int32, device=dev)
    for d in range(num_dest):
        rows = pos_nP[:, d].long()
        main = need_nP[:, d] & (rows < capacity)
        inv_PC[d, rows[main]] = tokens[main]
        extra = need_nP[:, d] & (rows >= capacity)
        ovf_PO[d, rows[extra] - capacity] = tokens[extra]
    counts_P = need_nP.sum(dim=0).to(torch.int32)
    return DispatchIndex(pos_nP, inv_PC, ovf_PO, counts_P)


def _write_rows(buf_BB: torch.Tensor, fmt: RowFormat, rows_R: torch.Tensor,
                tok_R: torch.Tensor, d: int, x_nH, topk_weights_nK, topk_ids_nK, token_slot_n,
                header: int, num_local_experts: int) -> None:
    """Byte rows ``rows_R`` of ``buf_BB`` for destination ``d``; ``tok_R == -1``: padding."""
    R, K = rows_R.numel(), fmt.top_k
    dev = buf_BB.device
    valid = tok_R >= 0
    t = tok_R[valid].long()  # only real tokens are gathered (an empty share has none)
    words = torch.zeros(R, fmt.meta_words, dtype=torch.int32, device=dev)
    w = torch.zeros(R, K, dtype=torch.float32, device=dev)
    w[valid] = topk_weights_nK[t].to(torch.float32)
    words[:, :K] = w.view(torch.int32)
    gid = torch.full((R, K), -1, dtype=torch.int64, device=dev)
    gid[valid] = topk_ids_nK[t].long()
    lo = d * num_local_experts
    own = (gid >= lo) & (gid < lo + num_local_experts)
    words[:, K:2 * K] = torch.where(own, gid - lo, -1).to(torch.int32)
    words[:, 2 * K] = -1
    if token_slot_n is not None:
        words[valid, 2 * K] = token_slot_n[t].to(torch.int32)
    words[:, fmt.header_word] = header
    x = torch.zeros(R, fmt.x_columns, dtype=fmt.dtype, device=dev)
    x[valid, :fmt.hidden] = x_nH[t].to(fmt.dtype)
    meta_b = fmt.x_offset
    buf_BB[rows_R, :meta_b] = words.view(torch.uint8)
    buf_BB[rows_R, meta_b:] = x.view(torch.uint8)


def _header(counts_P: torch.Tensor, d: int, capacity: int) -> int:
    overflow = bool((counts_P > capacity).any())
    return int(counts_P[d]) | (HEADER_OVERFLOW_BIT if overflow else 0)


def pack_main(buf_BB: torch.Tensor, fmt: RowFormat, x_nH: torch.Tensor,
              topk_weights_nK: torch.Tensor, topk_ids_nK: torch.Tensor,
              token_slot_n: torch.Tensor | None, index: DispatchIndex, *,
              num_local_experts: int, capacity: int, me: int, bypass: bool) -> None:
    """Write the ``C`` rows of every destination into its block of ``buf_BB`` (placement in
    :mod:`.wire`): x, weights, ids local to the destination, slot, header; padding rows
    carry ids ``-1``, slot ``-1``, weight 0 and x 0.

    Args:
        buf_BB: ``[B, row_bytes]`` uint8, ``B >= (P + send_blocks(P, bypass)) * C``.
        x_nH: ``[n, H]`` (rows may be strided); topk_weights_nK ``[n, K]`` fp32;
        topk_ids_nK ``[n, K]`` int32 global ids; token_slot_n ``[n]`` int32 or None (-1).
    """
    P = index.counts_P.numel()
    rows_C = torch.arange(capacity, device=buf_BB.device)
    for d in range(P):
        rows = dest_block(d, me, P, bypass) * capacity + rows_C
        _write_rows(buf_BB, fmt, rows, index.inv_PC[d], d, x_nH, topk_weights_nK,
                    topk_ids_nK, token_slot_n, _header(index.counts_P, d, capacity),
                    num_local_experts)


def pack_overflow(buf_BB: torch.Tensor, fmt: RowFormat, x_nH: torch.Tensor,
                  topk_weights_nK: torch.Tensor, topk_ids_nK: torch.Tensor,
                  token_slot_n: torch.Tensor | None, index: DispatchIndex, *,
                  num_local_experts: int, capacity: int, rows_P: list[int],
                  row_off_P: list[int]) -> None:
    """Write destination ``d``'s overflow rows (its rows ``C .. C + rows_P[d] - 1``) at rows
    ``row_off_P[d] ..`` of ``buf_BB``, in the format of :func:`pack_main`."""
    for d, (num, off) in enumerate(zip(rows_P, row_off_P)):
        if num:
            rows = off + torch.arange(num, device=buf_BB.device)
            _write_rows(buf_BB, fmt, rows, index.overflow_inv_PO[d, :num], d, x_nH,
                        topk_weights_nK, topk_ids_nK, token_slot_n,
                        _header(index.counts_P, d, capacity), num_local_experts)


def unpack_meta(rows_NB: torch.Tensor, fmt: RowFormat):
    """Contiguous ``topk_weights_NK`` fp32, ``topk_ids_NK`` int32 and ``token_slot_N`` int32
    from received byte rows ``rows_NB [N, row_bytes]`` uint8."""
    K = fmt.top_k
    words = fmt.words(rows_NB)
    return (words[:, :K].contiguous().view(torch.float32), words[:, K:2 * K].contiguous(),
            words[:, 2 * K].contiguous())


def combine(out_CH: torch.Tensor, pos_nP: torch.Tensor, y_NH: torch.Tensor,
            back_BH: torch.Tensor | None, back_overflow_OH: torch.Tensor | None,
            overflow_off_P: list[int] | None, *, capacity: int, me: int,
            bypass: bool) -> torch.Tensor:
    """Sum of each token's returned copies, destinations in order, in fp32 (fp64 for fp64).

    Args:
        out_CH: ``[C0, H]`` output; rows past the share's ``n`` tokens are set to zero.
        pos_nP: ``[n, P]`` rows of :func:`dispatch_index`.
        y_NH: ``[N, H]`` the experts' output on this rank (with ``bypass``, rows ``[0, C)``
            are this rank's results for its own tokens).
        back_BH: ``[B, H]`` results returned by the peers, in send-block order (None: P = 1).
        back_overflow_OH: results of the overflow rows, destination ``d``'s from row
            ``overflow_off_P[d]`` (None when nothing overflowed).
    Returns:
        ``out_CH``.
    """
    n, P = pos_nP.shape
    acc = torch.float64 if out_CH.dtype == torch.float64 else torch.float32
    total = torch.zeros(out_CH.shape, dtype=acc, device=out_CH.device)
    for d in range(P):
        pos = pos_nP[:, d].long()
        main = (pos >= 0) & (pos < capacity)
        bb = back_block(d, me, bypass) if P > 1 else None
        src = y_NH if bb is None else back_BH[bb * capacity:(bb + 1) * capacity]
        rows = main.nonzero().flatten()
        total[rows] += src[pos[rows]].to(acc)
        extra = (pos >= capacity).nonzero().flatten()
        if extra.numel():
            assert back_overflow_OH is not None and overflow_off_P is not None
            total[extra] += back_overflow_OH[overflow_off_P[d] + pos[extra] - capacity].to(acc)
    out_CH.copy_(total.to(out_CH.dtype))
    return out_CH
