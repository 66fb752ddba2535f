"""Reference of the dense-LoRA family (also the CPU path), with the signature of ``ops.py``.

Legend: T tokens, S slots, R max rank, I input features, O output features (both rank-local
under TP). The pool stores ``a [S, R, I]`` and ``b [S, O, R]`` with the LoRA scaling folded
into ``b``; ``token_slot_T`` says which slot each token uses (``-1``: none).

Isolation: the rows of one slot are selected and only ever meet that slot's factors, so a
slot's values (even NaN, were one loaded around the checks) cannot reach another row. The
shrink stays in fp32 (fp64 for fp64 inputs) up to the expand; each ``y`` gets its delta added
once and rounded once to its dtype.
"""

from __future__ import annotations

import torch


def add_dense_lora(ys: list[torch.Tensor], x_TI: torch.Tensor, a_list: list[torch.Tensor],
                   b_list: list[torch.Tensor], token_slot_T: torch.Tensor,
                   slot_rank_S: torch.Tensor, plan=None) -> None:
    """``y_j[t] += b_j[s_t] @ (a_j[s_t] @ x[t])`` for every token ``t`` with a slot ``s_t``.

    Args:
        ys: per module, its base output ``[T, O_j]`` (updated in place).
        x_TI: ``[T, I]`` the input every module of the group reads.
        a_list: per module ``[S, R, I]``; b_list: per module ``[S, O_j, R]`` (may be a view
            with strides, e.g. this rank's rows of a replicated ``b``).
        token_slot_T: ``[T]`` int slot per token, ``-1`` = none; slot_rank_S: ``[S]`` int,
            only the first ``slot_rank_S[s]`` rank rows of a slot are read.
        plan: unused here (the Triton path's token alignment); kept for one signature.
    """
    compute = torch.float64 if x_TI.dtype == torch.float64 else torch.float32
    slots = token_slot_T.long()
    for s in torch.unique(slots).tolist():
        r = int(slot_rank_S[s]) if s >= 0 else 0
        if r == 0:
            continue
        rows = (slots == s).nonzero().flatten()
        x = x_TI[rows].to(compute)
        for y, a, b in zip(ys, a_list, b_list):
            delta = (x @ a[s, :r].to(compute).T) @ b[s, :, :r].to(compute).T
            y.index_copy_(0, rows, (y[rows].to(compute) + delta).to(y.dtype))
