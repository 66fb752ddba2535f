"""Results of data-parallel replicas brought to global rank 0, as tensors (never pickled).

With ``world = dp * tp`` replica ``d`` serves requests ``i`` with ``i % dp == d``; its leader
(TP rank 0) holds their results. Each leader sends them to global rank 0 point to point inside
TP-rank-0's DP group: a sizes header, then one int64, one float32 and one uint8 (UTF-8 text)
tensor per completion, or the ``[L, V]`` fp32 logits whose shapes every rank knows. Other
ranks keep only their own share; on one replica nothing moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora_dist.engine.outputs import Completion, TokenLogprob

REASONS = ("length", "eos", "stop", "abort")


def _peers(groups):
    """``(active, ranks)``: whether this rank takes part (a replica leader, dp > 1) and the
    global rank of every replica's leader (index = dp rank)."""
    layout = groups.layout
    ranks = [layout.rank_of(d, 0, 0) for d in range(layout.dp)]
    return layout.dp > 1 and groups.rank_layout.tp_rank == 0, ranks


def _encode(c: Completion) -> tuple[list[int], list[float], bytes]:
    lps = c.logprobs or []
    plps = [p for p in (c.prompt_logprobs or [])[1:]]
    n_top = len(lps[0].top) if lps else 0
    n_ptop = len(plps[0].top) if plps else 0
    ints = [REASONS.index(c.finish_reason), len(c.output_ids), int(c.logprobs is not None),
            len(lps), n_top, int(c.prompt_logprobs is not None), len(plps), n_ptop,
            int(c.text is not None)] + list(c.output_ids)
    floats: list[float] = []
    for lp in lps + plps:
        ints.append(lp.token_id)
        ints += [t for t, _ in lp.top]
        floats.append(lp.logprob)
        floats += [v for _, v in lp.top]
    return ints, floats, (c.text or "").encode()


def _decode(ints: list[int], floats: list[float], text: bytes, i: int) -> Completion:
    reason, n_out, has_lp, n_lp, n_top, has_plp, n_plp, n_ptop, has_text = ints[:9]
    pos, fpos = 9 + n_out, 0

    def take(n, k):
        nonlocal pos, fpos
        out = []
        for _ in range(n):
            tok, tops = ints[pos], ints[pos + 1:pos + 1 + k]
            out.append(TokenLogprob(tok, floats[fpos], list(zip(tops, floats[fpos + 1:
                                                                           fpos + 1 + k]))))
            pos, fpos = pos + 1 + k, fpos + 1 + k
        return out

    lps, plps = take(n_lp, n_top), take(n_plp, n_ptop)
    return Completion(str(i), [], ints[9:9 + n_out], REASONS[reason],
                      text.decode() if has_text else None, lps if has_lp else None,
                      [None] + plps if has_plp else None)


def completions(groups, out: list) -> list:
    """``out[i]``: this replica's :class:`Completion` of request ``i`` (None elsewhere);
    complete on global rank 0 afterwards (prompt ids are not sent: rank 0 has them)."""
    active, ranks = _peers(groups)
    if not active:
        return out
    dp, me, dev = groups.layout.dp, groups.rank_layout.dp_rank, groups.device
    for i in range(len(out)):
        owner = i % dp
        if owner == 0:
            continue
        if me == 0:
            sizes = torch.empty(3, dtype=torch.int64, device=dev)
            dist.recv(sizes, src=ranks[owner], group=groups.dp_group)
            ni, nf, nb = sizes.tolist()
            bufs = [torch.empty(ni, dtype=torch.int64, device=dev),
                    torch.empty(nf, dtype=torch.float32, device=dev),
                    torch.empty(nb, dtype=torch.uint8, device=dev)]
            for b in bufs:
                if b.numel():
                    dist.recv(b, src=ranks[owner], group=groups.dp_group)
            out[i] = _decode(bufs[0].tolist(), bufs[1].tolist(), bytes(bufs[2].tolist()), i)
        elif me == owner:
            ints, floats, text = _encode(out[i])
            dist.send(torch.tensor([len(ints), len(floats), len(text)], device=dev),
                      dst=ranks[0], group=groups.dp_group)
            for b in (torch.tensor(ints, dtype=torch.int64),
                      torch.tensor(floats, dtype=torch.float32),
                      torch.tensor(list(text), dtype=torch.uint8)):
                if b.numel():
                    dist.send(b.to(dev), dst=ranks[0], group=groups.dp_group)
    return out


def logits(groups, out: list, shapes: list[tuple[int, int]]) -> list:
    """Bring every request's ``[L_i, V]`` fp32 logits to global rank 0 (``out[i]``: the CPU
    tensor where this replica computed it, else None; ``shapes`` known to every rank)."""
    active, ranks = _peers(groups)
    if not active:
        return out
    dp, me, dev = groups.layout.dp, groups.rank_layout.dp_rank, groups.device
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
