"""Inputs of the dispatch kernels, shared by the CPU (interpreter) and GPU tests.

Legend: n tokens of one share, H hidden, K top-k, P destinations, E_l experts per
destination, C capacity. Each named case is one share with a fixed seed; the ids mix what a
real batch holds (several k on one destination, ``-1`` pairs, whole rows of ``-1``) unless the
case says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> what it covers (parametrize ids in the tests)
CASES = {
    "mixed": "-1 in ids and slots, several k on one destination, overflow past C",
    "roomy": "C equals the share: no overflow possible",
    "at_capacity": "C equals the largest count: full blocks, nothing overflows",
    "empty_share": "n = 0 (T < P left this rank nothing): every row is padding",
    "skewed": "every token routes to destination 0 only; the others get padding only",
    "no_slot": "no adapter in the batch (token_slot None): slots travel as -1",
    "bad_ids": "ids below -1 and at or past P * E_l route nowhere",
    "one_k_odd_h": "K = 1 (one meta pad word) and an odd H",
    "wide": "P = 8, K = 8, C = 1 (almost everything overflows)",
}


@dataclass
class DispatchCase:
    x_nH: torch.Tensor
    topk_weights_nK: torch.Tensor
    topk_ids_nK: torch.Tensor
    token_slot_n: torch.Tensor | None
    num_local: int
    num_dest: int
    capacity: int

    @property
    def overflow_capacity(self) -> int:
        return max(self.x_nH.shape[0] - self.capacity, 0)


def make_case(name: str, *, dtype=torch.float32, device="cpu") -> DispatchCase:
    """The inputs of case ``name`` (see :data:`CASES`); x in ``dtype`` on ``device``."""
    if name not in CASES:
        raise ValueError(f"unknown dispatch case {name!r}; one of {sorted(CASES)}")
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    n, H, K, P, El, cap = 23, 40, 3, 3, 4, 5
    if name == "one_k_odd_h":
        H, K = 37, 1
    if name == "wide":
        n, K, P, El, cap = 29, 8, 8, 2, 1
    if name == "empty_share":
        n = 0
    ids = torch.randint(-1, P * El, (n, K), generator=g, dtype=torch.int32)
    if n:
        ids[n // 2] = -1  # a token with no expert at all
    if name == "skewed":
        ids = torch.randint(0, El, (n, K), generator=g, dtype=torch.int32)
    if name == "bad_ids":
        ids = torch.randint(-5, P * El + 4, (n, K), generator=g, dtype=torch.int32)
    slot = torch.randint(-1, 4, (n,), generator=g, dtype=torch.int32)
    counts = [int(((ids >= d * El) & (ids < (d + 1) * El)).any(dim=1).sum()) for d in range(P)]
    if name == "roomy":
        cap = max(n, 1)
    if name == "at_capacity":
        cap = max(max(counts), 1)
    x = torch.randn(n, H, generator=g).to(dtype)
    w = torch.rand(n, K, generator=g)
    return DispatchCase(x.to(device), w.to(device), ids.to(device),
                        None if name == "no_slot" else slot.to(device), El, P, cap)
