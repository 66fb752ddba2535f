"""The layer reference agrees with merged weights (W + s*B@A) and honours the sentinels."""

import torch

from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.moe.router import localize_topk_ids, route


def _setup(seed=0, T=9, H=12, E=4, I=10, K=2, S=3, R=4):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rn(T, H)
    w_gu, w_d = rn(E, 2 * I, H), rn(E, H, I)
    tw, tid = route(rn(T, E), K, renormalize=True)
    lora = MoELoRAWeights.zeros(S, E, R, H, I, dtype=torch.float64)
    ranks = [4, 2, 0]
    for s, r in enumerate(ranks):
        lora.gate_up_a[s, :, :r] = rn(E, r, H)
        lora.gate_up_a[s, :, R:R + r] = rn(E, r, H)
        lora.gate_up_b[s, :, :, :r] = rn(E, 2 * I, r)
        lora.down_a[s, :, :r] = rn(E, r, I)
        lora.down_b[s, :, :, :r] = rn(E, H, r)
        lora.slot_rank[s] = r
    return x, w_gu, w_d, tw, tid, lora


def _merged(w_gu, w_d, lora, s):
    R = lora.max_rank
    I = w_d.shape[2]
    a, b = lora.gate_up_a[s], lora.gate_up_b[s]
    dg = b[:, :I] @ a[:, :R]
    du = b[:, I:] @ a[:, R:]
    return w_gu + torch.cat([dg, du], 1), w_d + lora.down_b[s] @ lora.down_a[s]


def test_matches_merged_weights_per_slot():
    x, w_gu, w_d, tw, tid, lora = _setup()
    slots = torch.tensor([0, 1, -1, 0, 2, 1, -1, 0, 1], dtype=torch.int32)
    y = experts_reference(x, w_gu, w_d, tw, tid, slots, lora)
    for s in (-1, 0, 1, 2):
        rows = (slots == s).nonzero().flatten()
        if s < 0:
            mg, md = w_gu, w_d
        else:
            mg, md = _merged(w_gu, w_d, lora, s)
        y_s = experts_reference(x[rows], mg, md, tw[rows], tid[rows])
        torch.testing.assert_close(y[rows], y_s, rtol=1e-12, atol=1e-12)


def test_sentinel_experts_are_skipped_and_shards_sum():
    x, w_gu, w_d, tw, tid, lora = _setup(seed=1)
    slots = torch.tensor([0, 1, -1, 0, 2, 1, -1, 0, 1], dtype=torch.int32)
    full = experts_reference(x, w_gu, w_d, tw, tid, slots, lora)
    parts = []
    for start in (0, 2):
        local = localize_topk_ids(tid, start, 2)
        sub = MoELoRAWeights(**{k: (v[:, start:start + 2] if v.dim() == 4 else v)
                               for k, v in lora._asdict().items()})
        parts.append(experts_reference(x, w_gu[start:start + 2], w_d[start:start + 2],
                                       tw, local, slots, sub))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-12, atol=1e-12)


def test_localize_topk_ids_maps_owned_experts_and_is_the_identity_on_one_rank():
    """Every id in [-1, E) against a plain loop, for int starts and a [P, 1, 1] tensor of
    starts (the all-to-all's form); a rank owning all E experts gets the int32 ids themselves
    (no copy, no launch), and without ``num_experts`` the same values by the general path."""
    E, L = 8, 2
    ids = torch.tensor([[-1, 0, 1, 2], [3, 4, 5, 6], [7, 7, -1, 0]], dtype=torch.int32)

    def loop(start):
        return [[i - start if i >= 0 and start <= i < start + L else -1 for i in row]
                for row in ids.tolist()]

    for start in range(0, E, L):
        got = localize_topk_ids(ids, start, L, E)
        assert got.dtype == torch.int32 and got.tolist() == loop(start)
    starts = torch.arange(0, E, L).view(-1, 1, 1)
    got = localize_topk_ids(ids.unsqueeze(0), starts, L)
    assert got.dtype == torch.int32 and got.tolist() == [loop(s) for s in range(0, E, L)]
    assert localize_topk_ids(ids, 0, E, E) is ids
    assert localize_topk_ids(ids, 0, E).tolist() == ids.tolist()
    assert localize_topk_ids(ids.long(), 0, E, E).dtype == torch.int32
