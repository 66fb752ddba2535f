"""Dispatcher pieces that need no process group: byte packing, token shares."""

import pytest
import torch

from moelora_dist.moe.dispatch import make_dispatcher
from moelora_dist.moe.dispatch.packing import (meta_row, pack_rows, row_layout, share_bounds,
                                               unpack_rows)
from moelora_dist.parallel.groups import ParallelGroups


@pytest.mark.parametrize("dtype,hidden", [(torch.bfloat16, 3), (torch.float32, 5),
                                          (torch.float64, 4), (torch.float16, 2048)],
                         ids=["bf16-odd-H", "fp32-odd-H", "fp64", "fp16-large"])
def test_pack_roundtrip_is_exact_and_aligned(dtype, hidden):
    g = torch.Generator().manual_seed(0)
    S, K = 7, 3
    x = torch.randn(S, hidden, generator=g).to(dtype)
    w = torch.rand(S, K, generator=g)
    ids = torch.randint(-1, 8, (S, K), generator=g, dtype=torch.int32)
    slot = torch.randint(-1, 4, (S,), generator=g, dtype=torch.int32)
    rows = pack_rows(meta_row(w, ids, slot[:, None]), x)
    assert rows.dtype == torch.uint8 and rows.shape[1] % 16 == 0
    assert row_layout(hidden, K, dtype)[0] % 16 == 0
    assert rows.shape[1] == row_layout(hidden, K, dtype)[1]
    x2, w2, ids2, slot2 = unpack_rows(rows, hidden, K, dtype)
    assert torch.equal(x2, x) and torch.equal(w2, w)
    assert torch.equal(ids2, ids) and torch.equal(slot2, slot)


def test_pack_of_zero_rows():
    rows = pack_rows(meta_row(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32),
                              torch.zeros(0, 1, dtype=torch.int32)), torch.zeros(0, 4))
    x, w, ids, slot = unpack_rows(rows, 4, 2, torch.float32)
    assert x.shape == (0, 4) and w.shape == (0, 2) and ids.shape == (0, 2) and slot.shape == (0,)


@pytest.mark.parametrize("ep", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("num_tokens", [0, 1, 2, 7, 64])
def test_shares_tile_the_tokens(num_tokens, ep):
    bounds = [share_bounds(num_tokens, ep, r) for r in range(ep)]
    covered = [t for s, e in bounds for t in range(s, e)]
    assert covered == list(range(num_tokens))
    chunk = -(-num_tokens // ep)
    assert all(e - s <= chunk for s, e in bounds)


def test_unknown_dispatcher_is_refused():
    g = ParallelGroups.single()
    with pytest.raises(ValueError, match="unknown dispatcher 'a2a'"):
        make_dispatcher("a2a", g, g.rank_layout.moe_shard(4, 4))
