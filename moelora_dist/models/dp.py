"""Data parallelism over whole requests, when more processes run than one TP group needs.

With ``world = dp * tp`` the runner gives request ``i`` to replica ``i % dp``; every rank of a
replica's TP group runs the same share. Results then travel to global rank 0 (the one that
writes files) with point-to-point messages inside TP-rank-0's DP group: plain tensors whose
shapes the receiver knows or receives first, never pickled objects. Other ranks keep only
their own share; on one replica (``dp == 1``) nothing moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def replica_indices(groups, num_requests: int) -> list[int]:
    """Indices of the requests this rank's replica serves (all of them when ``dp == 1``)."""
    dp, rank = groups.layout.dp, groups.rank_layout.dp_rank
    return [i for i in range(num_requests) if i % dp == rank]


def _peers(groups):
    """``(active, ranks)``: whether this rank takes part (TP rank 0 of its replica) and the
    global rank of TP rank 0 in every replica (index = dp_rank)."""
    layout = groups.layout
    ranks = [layout.rank_of(d, 0, 0) for d in range(layout.dp)]
    return layout.dp > 1 and groups.rank_layout.tp_rank == 0, ranks


def gather_logits(groups, out: list, shapes: list[tuple[int, int]]) -> list:
    """Bring every request's ``[L_i, V]`` float32 logits to global rank 0.

    Args:
        out: per request, the CPU tensor when this replica computed it, else None.
        shapes: ``(L_i, V)`` of every request (known to every rank).
    Returns:
        ``out``, complete on global rank 0.
    """
    active, ranks = _peers(groups)
    if not active:
        return out
    dp, me = groups.layout.dp, groups.rank_layout.dp_rank
    dev = groups.device
    for i, shape in enumerate(shapes):
        owner = i % dp
        if owner == 0:
            continue
        if me == 0:
            buf = torch.empty(shape, dtype=torch.float32, device=dev)
            dist.recv(buf, src=ranks[owner], group=groups.dp_group)
            out[i] = buf.cpu()
        elif me == owner:
            dist.send(out[i].to(dev).contiguous(), dst=ranks[0], group=groups.dp_group)
    return out


def gather_generations(groups, out: list, make) -> list:
    """Bring every request's ``(output_ids, finish_reason)`` to global rank 0.

    ``out[i]`` has ``.output_ids`` and ``.finish_reason`` on its owner, None elsewhere;
    ``make(ids, reason)`` rebuilds one on rank 0. Each message is a length ``[1]`` then
    ``[reason code] + ids`` (int64).
    """
    active, ranks = _peers(groups)
    if not active:
        return out
    dp, me = groups.layout.dp, groups.rank_layout.dp_rank
    dev, reasons = groups.device, ("length", "eos")
    for i in range(len(out)):
        owner = i % dp
        if owner == 0:
            continue
        if me == 0:
            n = torch.empty(1, dtype=torch.int64, device=dev)
            dist.recv(n, src=ranks[owner], group=groups.dp_group)
            msg = torch.empty(int(n) + 1, dtype=torch.int64, device=dev)
            dist.recv(msg, src=ranks[owner], group=groups.dp_group)
            vals = msg.tolist()
            out[i] = make(vals[1:], reasons[vals[0]])
        elif me == owner:
            g = out[i]
            msg = torch.tensor([reasons.index(g.finish_reason)] + list(g.output_ids),
                               dtype=torch.int64, device=dev)
            dist.send(torch.tensor([len(g.output_ids)], dtype=torch.int64, device=dev),
                      dst=ranks[0], group=groups.dp_group)
            dist.send(msg, dst=ranks[0], group=groups.dp_group)
    return out
