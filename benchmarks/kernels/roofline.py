"""What a MoE LoRA layer call must move and compute: its own roofline.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, K top-k, r rank.

    base bytes     every base expert weight with >= 1 valid pair: 3 H I_l per expert
    adapter bytes  every (slot, expert) pair with >= 1 token: A_gate|A_up 2 r H (once per slot
                   when shared), B_gate|B_up 2 I_l r, A_down r I_l, B_down H r (once per slot
                   when shared), at the slot's own rank
    FLOPs          2 x pairs x (3 H I_l) base; per LoRA pair 2 x r x (2H + 2 I_l + I_l + H)

A case's floor is max(bytes / HBM bandwidth, FLOPs / bf16 peak), with both rates measured in the
same run (``benchmarks/common.py``). The LoRA extra time (the layer with adapters minus the base
layer) is compared with the adapters' own floor: their bytes and FLOPs alone.
"""

from __future__ import annotations

import torch


def _pairs(inp):
    ids = inp["topk_ids_TK"]
    valid = (ids >= 0) & (ids < inp["w_gate_up_EXH"].shape[0])
    return ids, valid


def base_weight_bytes(inp) -> int:
    E, two_i, H = inp["w_gate_up_EXH"].shape
    ids, valid = _pairs(inp)
    n = int(ids[valid].unique().numel())
    return n * 3 * (two_i // 2) * H * inp["x_TH"].element_size()


def base_flops(inp) -> float:
    E, two_i, H = inp["w_gate_up_EXH"].shape
    _, valid = _pairs(inp)
    return 2.0 * int(valid.sum()) * 3 * H * (two_i // 2)


def _lora_pairs(inp):
    """(slot, expert) of every valid pair of a token with an enabled slot, and the slots."""
    lora, ts = inp["lora"], inp["token_slot_T"]
    if lora is None or ts is None:
        return None
    ids, valid = _pairs(inp)
    slot = ts.long()
    ok = (slot >= 0) & inp["slot_enabled_S"][slot.clamp(min=0)] & (
        lora.slot_rank[slot.clamp(min=0)] > 0)
    mask = valid & ok[:, None]
    s = slot[:, None].expand_as(ids)[mask]
    return s, ids[mask].long()


def adapter_bytes(inp) -> int:
    """Bytes of the adapter factors the call must read, at each slot's own rank."""
    got = _lora_pairs(inp)
    if got is None:
        return 0
    s, e = got
    lora = inp["lora"]
    E, two_i, H = inp["w_gate_up_EXH"].shape
    I = two_i // 2
    size = lora.gate_up_b.element_size()
    pairs = torch.unique(s * E + e)
    rank = lora.slot_rank.long()
    total = 0
    for slot in s.unique().tolist():
        r = int(rank[slot])
        n = int(((pairs // E) == slot).sum())
        a = 1 if bool(lora.gate_up_a_shared[slot]) else n
        b = 1 if bool(lora.down_b_shared[slot]) else n
        total += (a * 2 * r * H + n * (2 * I * r + r * I) + b * H * r) * size
    return total


def adapter_flops(inp) -> float:
    got = _lora_pairs(inp)
    if got is None:
        return 0.0
    s, _ = got
    E, two_i, H = inp["w_gate_up_EXH"].shape
    I = two_i // 2
    r = inp["lora"].slot_rank.long()[s].double()
    return float((2 * r * (2 * H + 3 * I + H)).sum())


def floors(inp, roof: dict) -> dict:
    """The case's floor and the adapters' own floor, in ms, with the counts they come from."""
    bw, peak = roof["hbm_bytes_per_s"], roof["bf16_flops"]
    wb, ab = base_weight_bytes(inp), adapter_bytes(inp)
    bf, af = base_flops(inp), adapter_flops(inp)
    return dict(weight_bytes=wb, adapter_bytes=ab, flops=bf + af,
                roofline_ms=1e3 * max((wb + ab) / bw, (bf + af) / peak),
                adapter_floor_ms=1e3 * max(ab / bw, af / peak) if ab else 0.0)
