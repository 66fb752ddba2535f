"""Plain-loop references of the routers of :mod:`.router`, readable as the math: one token at
a time, sorting Python lists. Ties are broken by the lower expert (group) index, which is a
valid choice but not necessarily the one ``torch.topk`` (and transformers) makes; the tests
compare these references with :mod:`.router` on inputs without ties, and the fast paths with
transformers' own modules on inputs with ties.

Legend: T tokens, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import math

import torch


def _best(values: list[float], k: int, allowed=None) -> list[int]:
    """Indices of the ``k`` largest values (lower index first among equals)."""
    idx = [i for i in range(len(values)) if allowed is None or i in allowed]
    return sorted(idx, key=lambda i: (-values[i], i))[:k]


def sigmoid_grouped_reference(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int,
                              n_group: int, topk_group: int, renormalize: bool,
                              scaling: float):
    """``(weights [T, K] fp64, ids [T, K] int64)``; ids in order of decreasing choice."""
    T, E = logits_TE.shape
    per = E // n_group
    w_out = torch.zeros(T, top_k, dtype=torch.float64)
    id_out = torch.zeros(T, top_k, dtype=torch.int64)
    for t in range(T):
        scores = [1 / (1 + math.exp(-float(v))) for v in logits_TE[t].double()]
        choice = [s + float(b) for s, b in zip(scores, bias_E.double())]
        group_score = [sum(sorted(choice[g * per:(g + 1) * per], reverse=True)[:2])
                       for g in range(n_group)]
        groups = _best(group_score, topk_group)
        allowed = {e for g in groups for e in range(g * per, (g + 1) * per)}
        ids = _best(choice, top_k, allowed)
        w = [scores[e] for e in ids]  # the unbiased scores weigh the chosen experts
        if renormalize:
            total = sum(w) + 1e-20
            w = [x / total for x in w]
        w_out[t] = torch.tensor([x * scaling for x in w], dtype=torch.float64)
        id_out[t] = torch.tensor(ids)
    return w_out, id_out


def topk_softmax_reference(logits_TE: torch.Tensor, top_k: int):
    """gpt-oss: ``(weights [T, K] fp64, ids [T, K] int64)``: softmax over the k best logits."""
    T, _ = logits_TE.shape
    w_out = torch.zeros(T, top_k, dtype=torch.float64)
    id_out = torch.zeros(T, top_k, dtype=torch.int64)
    for t in range(T):
        vals = [float(v) for v in logits_TE[t].double()]
        ids = _best(vals, top_k)
        m = max(vals[e] for e in ids)
        ex = [math.exp(vals[e] - m) for e in ids]
        w_out[t] = torch.tensor([x / sum(ex) for x in ex], dtype=torch.float64)
        id_out[t] = torch.tensor(ids)
    return w_out, id_out
