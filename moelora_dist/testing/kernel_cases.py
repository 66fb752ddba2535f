"""Input factory shared by the CPU (interpreter) and GPU kernel tests and the benchmark.

Each named case builds one layer's inputs with a fixed seed. The slot table of every LoRA
case mixes what one real batch can hold: per-expert and shared-outer adapters, different
ranks, an empty slot (rank 0), and a loaded slot that no request of this batch uses
(``slot_enabled`` False) although some token still names it -- it must get no delta.
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.weights import MoELoRAWeights

# name -> what it covers (parametrize ids in the tests)
CASES = {
    "mixed": "-1 in topk_ids and token_slot, 4 slots of ranks R, R/2, 0, R (disabled)",
    "empty_expert": "the last expert gets no pair",
    "one_expert": "every token routes to expert 0 (other k are -1)",
    "t_lt_block": "T smaller than BLOCK_M",
    "no_lora_tokens": "LoRA buffers given but every token_slot is -1",
    "all_invalid": "every topk id is -1: the output is exactly zero",
    "many_slots": "7 enabled slots (ranks R..R/4, shared A and B mixed) + a rank-0 one: blocks "
                  "hold more slot runs than one stacked expand dot takes",
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation with NaN (floats) or a huge value (ints) so an unwritten element
    fails a test instead of passing by luck."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max // 2)


def make_lora(S: int, E: int, R: int, H: int, I: int, dtype, device, g, *,
              ranks=None, shared_a=None, shared_b=None, scale: float = 0.2) -> MoELoRAWeights:
    """Pool buffers with slot ``s`` of rank ``ranks[s]``; rows past a slot's rank stay zero."""
    ranks = ranks if ranks is not None else [R] * S
    lora = MoELoRAWeights.zeros(S, E, R, H, I, dtype=dtype, device=device)
    rn = lambda *s: (torch.randn(*s, generator=g, device=g.device) * scale).to(device=device,
                                                                          dtype=dtype)
    for s, r in enumerate(ranks):
        if r == 0:
            continue
        sa = bool(shared_a[s]) if shared_a is not None else False
        sb = bool(shared_b[s]) if shared_b is not None else False
        ea, eb = (1 if sa else E), (1 if sb else E)
        lora.gate_up_a[s, :ea, :r] = rn(ea, r, H) * H ** -0.5 / scale
        lora.gate_up_a[s, :ea, R:R + r] = rn(ea, r, H) * H ** -0.5 / scale
        lora.gate_up_b[s, :, :, :r] = rn(E, 2 * I, r)
        lora.down_a[s, :, :r] = rn(E, r, I) * I ** -0.5 / scale
        lora.down_b[s, :eb, :, :r] = rn(eb, H, r)
        lora.gate_up_a_shared[s] = sa
        lora.down_b_shared[s] = sb
        lora.slot_rank[s] = r
    return lora


def make_case(name: str, *, T=12, H=32, E=4, I=24, K=2, R=16, dtype=torch.float32,
              device="cpu", seed=0):
    """Inputs of one case: dict with x_TH, w_gate_up_EXH, w_down_EHI, topk_weights_TK,
    topk_ids_TK, token_slot_T, lora, slot_enabled_S."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {sorted(CASES)}")
    g = torch.Generator().manual_seed(seed)
    T = 3 if name == "t_lt_block" else T
    to = dict(device=device, dtype=dtype)
    x = torch.randn(T, H, generator=g).to(**to)
    w_gu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(**to)
    w_d = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(**to)
    # Distinct experts per token, as a router gives.
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    tw = torch.rand(T, K, generator=g)
    if name == "mixed":
        ids[torch.rand(T, K, generator=g) < 0.2] = -1
    elif name == "empty_expert":
        ids[ids == E - 1] = -1
    elif name == "one_expert":
        ids[:, 0] = 0
        ids[:, 1:] = -1
    elif name == "all_invalid":
        ids[:] = -1
    elif name == "many_slots":
        ids[torch.rand(T, K, generator=g) < 0.1] = -1
    if name == "many_slots":
        S, ranks = 8, [R, R // 2, R // 4, R, 0, R // 2, R, R]
        shared_a = [False, True, False, False, False, False, True, False]
        shared_b = [True, False, False, True, False, False, False, False]
        enabled = torch.tensor([True] * 8)
    else:
        S, ranks = 4, [R, R // 2, 0, R]
        shared_a, shared_b = [False, True, False, True], [True, False, False, False]
        enabled = torch.tensor([True, True, False, False])
    slot = torch.randint(-1, S, (T,), generator=g).to(torch.int32)
    if name == "no_lora_tokens":
        slot[:] = -1
    lora = make_lora(S, E, R, H, I, dtype, device, g, ranks=ranks, shared_a=shared_a,
                     shared_b=shared_b)
    if name == "no_lora_tokens":
        enabled[:] = False
    return dict(x_TH=x, w_gate_up_EXH=w_gu, w_down_EHI=w_d, topk_weights_TK=tw.to(device),
                topk_ids_TK=ids.to(device), token_slot_T=slot.to(device), lora=lora,
                slot_enabled_S=enabled.to(device))
