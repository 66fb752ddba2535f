"""The model's parts on one process: dense multi-LoRA, the paged batch layout, the KV pages,
head split, and each rank's weight slices (mocked ranks, no process group)."""

from __future__ import annotations

import pytest
import torch

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.lora.pool_types import DenseLoRABuffers, PoolConfig
from moelora_dist.models.attention import HeadSplit
from moelora_dist.models.batch import ForwardBatch, PagedKVCache
from moelora_dist.models.lora_linear import DenseLoRA
from moelora_dist.testing.references import dense_lora_token_loop as lora_delta_reference


class _FakePool:
    def __init__(self, bufs, S, R=4):
        self.config = PoolConfig(max_loras=S, max_rank=R)
        self.bufs = bufs
        self.slot_rank_S = torch.full((S,), R, dtype=torch.int32)

    def dense_buffers(self, path):
        return self.bufs[path]


def _info(slot_T, S=3):
    enabled = torch.zeros(S, dtype=torch.bool)
    enabled[slot_T[slot_T >= 0].long()] = True
    return BatchInfo(slot_T, enabled, int((slot_T >= 0).sum()))


def _bufs(S=3, R=4, I=10, O=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = DenseLoRABuffers.zeros(S, R, I, O, dtype=torch.float32)
    b.a.copy_(torch.randn(S, R, I, generator=g))
    b.b.copy_(torch.randn(S, O, R, generator=g))
    return b


@pytest.mark.parametrize("slots", [
    [0, 1, 2, -1, 1, 0],  # every slot and base tokens mixed
    [-1, -1],             # no adapter token: delta exactly zero
    [2],                  # a single token (decode of one request)
], ids=["mixed", "all_base", "one_token"])
def test_dense_lora_matches_token_loop(slots):
    buf = _bufs()
    pool = _FakePool({"m": buf}, 3)
    slot_T = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(len(slots), 10)
    ctx = DenseLoRA(pool, _info(slot_T), "torch")
    got = ctx.apply(torch.zeros(len(slots), 6), x, "m")
    want = lora_delta_reference(x, buf.a, buf.b, slot_T)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[slot_T < 0] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_lora_out_rows_and_rewritten_slot(backend):
    """Rows of a replicated b (kv heads), and a slot rewritten in place between forwards:
    the kernels read the pool's buffers, so the next forward serves the new values."""
    buf = _bufs()
    pool = _FakePool({"m": buf}, 3)
    slot_T = torch.tensor([0, 1, 2, -1], dtype=torch.int32)
    x = torch.randn(4, 10)
    rows = slice(2, 4)  # a replicated kv module: this rank computes output rows 2..3
    got = DenseLoRA(pool, _info(slot_T), backend).apply(torch.zeros(4, 2), x, "m", rows)
    want = lora_delta_reference(x, buf.a, buf.b, slot_T)[:, rows]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    buf.b.mul_(2)
    got2 = DenseLoRA(pool, _info(slot_T), backend).apply(torch.zeros(4, 2), x, "m", rows)
    torch.testing.assert_close(got2, 2 * want, atol=1e-5, rtol=1e-5)


def test_forward_batch_layout_and_slots():
    # sequence 0: 3 new tokens after 2 cached, in pages [7, 2] of 4 tokens; sequence 1: one
    # new token (decode) after 4 cached, in pages [5, 0]
    b = ForwardBatch.build([3, 1], [2, 4], [[7, 2], [5, 0]], 4, "cpu")
    assert b.positions_T.tolist() == [2, 3, 4, 4]
    assert b.seg_indptr_B1.tolist() == [0, 3, 4] and b.kv_lens_B.tolist() == [5, 5]
    assert b.slot_mapping_T.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 0 * 4 + 0]
    assert b.block_tables_BM.tolist() == [[7, 2], [5, 0]]
    assert b.last_token_index_B.tolist() == [2, 3] and not b.decode_only
    assert ForwardBatch.build([1, 1], [0, 3], [[1], [4]], 4, "cpu").decode_only


def test_forward_batch_refuses_empty_requests_and_short_tables():
    with pytest.raises(ValueError, match="at least one token"):
        ForwardBatch.build([2, 0], [0, 0], [[0], [1]], 4, "cpu")
    with pytest.raises(ValueError, match="needs more than its 1 pages"):
        ForwardBatch.build([3], [2], [[0]], 4, "cpu")


def test_paged_cache_write_and_read_through_block_tables():
    """Keys land in the slot the block table says; attention of a sequence reads its own
    pages only (another sequence's page holds NaN and changes nothing)."""
    from moelora_dist.kernels.paged_attention import naive

    cache = PagedKVCache(1, num_pages=4, page_size=2, num_kv_heads=1, head_dim=2,
                         dtype=torch.float32, device="cpu")
    assert cache.nbytes() == 2 * 4 * 2 * 1 * 2 * 4
    assert PagedKVCache.page_bytes(1, 2, 1, 2, torch.float32) == 2 * 2 * 2 * 4
    b = ForwardBatch.build([3], [0], [[3, 1]], 2, "cpu")
    k = torch.arange(6.0).view(3, 1, 2)
    cos, sin = naive.rope_tables(2, 1e4, 8)
    cache.k[0][0].fill_(float("nan"))  # page 0 belongs to nobody here
    cache.v[0][0].fill_(float("nan"))
    q = naive.rope_write(k, k, k, b.positions_T, torch.ones_like(cos), torch.zeros_like(sin),
                         b.slot_mapping_T, cache.k[0], cache.v[0])
    assert cache.k[0][3].flatten().tolist() == [0, 1, 2, 3]
    assert cache.k[0][1, 0].flatten().tolist() == [4, 5]
    out = naive.paged_attention(q, cache.k[0], cache.v[0], b.block_tables_BM, b.kv_lens_B,
                                b.seg_indptr_B1, scale=1.0)
    assert torch.isfinite(out).all()


def _cfg(heads=8, kv=2):
    return ModelConfig.from_dict(dict(
        model_type="mixtral", vocab_size=16, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv, num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=8))


@pytest.mark.parametrize("tp,rank,want", [
    (2, 1, HeadSplit(4, 4, 1, 1, 1)),   # kv heads split like q heads
    (4, 3, HeadSplit(6, 2, 1, 1, 2)),   # 2 kv heads on 4 ranks: ranks 2, 3 share kv head 1
    (8, 2, HeadSplit(2, 1, 0, 1, 4)),
])
def test_head_split(tp, rank, want):
    assert HeadSplit.for_rank(_cfg(), tp, rank) == want


def test_head_split_refusals():
    with pytest.raises(ModelConfigError, match="num_attention_heads=8 is not divisible by tp=3"):
        HeadSplit.for_rank(_cfg(), 3, 0)
    with pytest.raises(ModelConfigError, match="not divisible by tp=4"):
        HeadSplit.for_rank(_cfg(heads=12, kv=6), 4, 0)
    with pytest.raises(ModelConfigError, match="multiple of num_key_value_heads=3"):
        HeadSplit.for_rank(_cfg(heads=12, kv=3), 4, 0)


def test_paged_attention_reference_matches_per_head_math():
    """The reference's grouped-query stacking equals plain per-head causal softmax attention
    (decode rows and a prefill chunk after cached keys, pages out of order)."""
    from moelora_dist.kernels.paged_attention import naive

    g = torch.Generator().manual_seed(0)
    S, Nk, Nq, D = 2, 2, 4, 8
    kp, vp = torch.randn(6, S, Nk, D, generator=g), torch.randn(6, S, Nk, D, generator=g)
    tables = [[4, 1], [2, 5, 0]]  # sequence 0: 4 keys; sequence 1: 5 keys
    for new, prefix in (([1, 1], [3, 4]), ([3, 1], [1, 4])):
        b = ForwardBatch.build(new, prefix, tables, S, "cpu")
        q = torch.randn(sum(new), Nq, D, generator=g)
        got = naive.paged_attention(q, kp, vp, b.block_tables_BM, b.kv_lens_B,
                                    b.seg_indptr_B1, scale=D ** -0.5)
        for t in range(sum(new)):
            r = 0 if t < new[0] else 1
            pos = int(b.positions_T[t])
            keys = [(tables[r][j // S], j % S) for j in range(pos + 1)]
            for h in range(Nq):
                kh = h // 2  # two query heads per kv head
                k = torch.stack([kp[p, o, kh] for p, o in keys])
                v = torch.stack([vp[p, o, kh] for p, o in keys])
                p_ = torch.softmax((k @ q[t, h]) * D ** -0.5, dim=0)
                torch.testing.assert_close(got[t, h], p_ @ v, atol=1e-5, rtol=1e-5)
