"""PyTorch references of the grouped-GEMM family, with the signatures of ``ops.py``.

They walk the same alignment blocks as the kernels (so a wrong block label or a missing row
shows up as a difference) but compute each block with plain matmuls in fp32. Outputs have the
kernels' shapes; rows a kernel leaves unset (invalid pairs, tokens without a shared-A slot)
are NaN here, so a test can check that the kernel writes exactly the rows it promises.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.activations import glu
from moelora_dist.kernels.align.common import Alignment
from moelora_dist.kernels.constants import block_r, check_activation
from moelora_dist.kernels.weights import MoELoRAWeights


def _blocks(al: Alignment):
    """(bucket, items) for each block that a kernel computes."""
    n = int(al.num_post_pad)
    for j in range(n // al.block_m):
        bucket = int(al.block_bucket[j])
        if bucket < 0:
            continue
        items = al.sorted_ids[j * al.block_m:(j + 1) * al.block_m].long()
        yield bucket, items[items < al.num_items]


def _eff_slots(tok, token_slot_T, slot_enabled_S, slot_rank_S):
    slot = token_slot_T.long()[tok]
    safe = slot.clamp(min=0)
    ok = (slot >= 0) & slot_enabled_S.bool()[safe] & (slot_rank_S[safe] > 0)
    return torch.where(ok, slot, torch.full_like(slot, -1))


def lora_shrink(x_TH, lora: MoELoRAWeights, al: Alignment, top_k: int, **_tiles):
    """Reference of :func:`ops.lora_shrink`."""
    T, _ = x_TH.shape
    R, BR, E = lora.a_half_rows, block_r(lora.max_rank), lora.num_local_experts
    out = torch.full((T * top_k + T, 2 * BR), float("nan"), device=x_TH.device)
    for bucket, items in _blocks(al):
        slot, e = divmod(bucket, E)
        ea = 0 if bool(lora.gate_up_a_shared[slot]) else e
        r = int(lora.slot_rank[slot])
        tok = torch.where(items < T * top_k, items // top_k, items - T * top_k)
        x = x_TH[tok].float()
        a = lora.gate_up_a[slot, ea].float()
        rows = torch.zeros(len(items), 2 * BR, device=x_TH.device)
        rows[:, :r] = x @ a[:r].T
        rows[:, BR:BR + r] = x @ a[R:R + r].T
        out[items] = rows
    return out


def gate_up(x_TH, w_gate_up_EXH, al: Alignment, top_k: int, token_slot_T=None,
            slot_enabled_S=None, lora: MoELoRAWeights | None = None, shrink=None,
            activation="silu", bias_EX=None, **_tiles):
    """Reference of :func:`ops.gate_up` (``bias_EX``: ``[E_l, 2*I_l]`` or None; ``shrink`` may
    be ``[P, N', 2BR]`` partials)."""
    check_activation(activation)
    if shrink is not None and shrink.dim() == 3:
        shrink = shrink.sum(0)
    T, _ = x_TH.shape
    inter = w_gate_up_EXH.shape[1] // 2
    N = T * top_k
    h = torch.full((N, inter), float("nan"), dtype=x_TH.dtype, device=x_TH.device)
    BR = block_r(lora.max_rank) if lora is not None else 0
    for e, items in _blocks(al):
        tok = items // top_k
        gu = x_TH[tok].float() @ w_gate_up_EXH[e].float().T
        if bias_EX is not None:
            gu = gu + bias_EX[e].float()
        if lora is not None:
            slots = _eff_slots(tok, token_slot_T, slot_enabled_S, lora.slot_rank)
            for s in slots.unique().tolist():
                if s < 0:
                    continue
                sel = slots == s
                r = int(lora.slot_rank[s])
                src = tok + N if bool(lora.gate_up_a_shared[s]) else items
                sh = shrink[src[sel]]
                b = lora.gate_up_b[s, e].float()
                gu[sel, :inter] += sh[:, :r] @ b[:inter, :r].T
                gu[sel, inter:] += sh[:, BR:BR + r] @ b[inter:, :r].T
        hh = glu(activation, gu[:, :inter], gu[:, inter:])
        h[items] = hh.to(h.dtype)
    return h


def down_shrink(h, lora: MoELoRAWeights, al: Alignment, top_k: int, token_slot_T,
                slot_enabled_S, **_tiles):
    """Reference of :func:`ops.down_shrink` (rows without an enabled slot are NaN)."""
    N, _ = h.shape
    out = torch.full((N, block_r(lora.max_rank)), float("nan"), device=h.device)
    for e, items in _blocks(al):
        slots = _eff_slots(items // top_k, token_slot_T, slot_enabled_S, lora.slot_rank)
        for s in slots.unique().tolist():
            if s < 0:
                continue
            sel = items[slots == s]
            r = int(lora.slot_rank[s])
            out[sel] = 0.0
            out[sel, :r] = h[sel].float() @ lora.down_a[s, e, :r].float().T
    return out


def down(h, w_down_EHI, topk_weights_TK, al: Alignment, top_k: int, token_slot_T=None,
         slot_enabled_S=None, lora: MoELoRAWeights | None = None, dshrink=None, bias_EH=None,
         **_tiles):
    """Reference of :func:`ops.down` (``bias_EH``: ``[E_l, H]`` or None; ``dshrink`` may be
    ``[P, N, BR]`` partials)."""
    if dshrink is not None and dshrink.dim() == 3:
        dshrink = dshrink.sum(0)
    N, _ = h.shape
    H = w_down_EHI.shape[1]
    out = torch.full((N, H), float("nan"), dtype=h.dtype, device=h.device)
    tw = topk_weights_TK.reshape(-1).float()
    for e, items in _blocks(al):
        y = h[items].float() @ w_down_EHI[e].float().T
        if bias_EH is not None:
            y = y + bias_EH[e].float()
        if lora is not None:
            slots = _eff_slots(items // top_k, token_slot_T, slot_enabled_S, lora.slot_rank)
            for s in slots.unique().tolist():
                if s < 0:
                    continue
                sel = slots == s
                r = int(lora.slot_rank[s])
                eb = 0 if bool(lora.down_b_shared[s]) else e
                y[sel] += dshrink[items[sel], :r] @ lora.down_b[s, eb, :, :r].float().T
        out[items] = (tw[items, None] * y).to(out.dtype)
    return out


def topk_sum(out_NH, topk_ids_TK, num_experts: int, out_dtype=None, **_tiles):
    """Reference of :func:`ops.topk_sum`."""
    T, K = topk_ids_TK.shape
    ok = (topk_ids_TK >= 0) & (topk_ids_TK < num_experts)
    vals = torch.where(ok.reshape(-1, 1), out_NH.float(), torch.zeros((), device=out_NH.device))
    return vals.view(T, K, -1).sum(1).to(out_dtype or out_NH.dtype)
