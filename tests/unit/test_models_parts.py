"""The model runner's parts on one process: dense multi-LoRA, batch layout and masks, KV cache,
head split, and each rank's weight slices (mocked ranks, no process group)."""

from __future__ import annotations

import pytest
import torch

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.lora.pool_types import DenseLoRABuffers, PoolConfig
from moelora_dist.models.attention import HeadSplit
from moelora_dist.models.batch import ForwardBatch, KVCache
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


def test_forward_batch_layout_and_mask():
    # request 0: 3 new tokens after 2 cached; request 1: 1 new token (decode) after 4 cached
    b = ForwardBatch.build([3, 1], [2, 4], "cpu")
    assert b.positions_T.tolist() == [2, 3, 4, 4]
    assert b.req_T.tolist() == [0, 0, 0, 1] and b.j_T.tolist() == [0, 1, 2, 0]
    assert b.kv_lens_B.tolist() == [5, 5] and (b.max_q, b.max_kv) == (3, 5)
    m = b.attn_mask_B1QL[:, 0]
    assert m[0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert m[1, 0].int().tolist() == [1, 1, 1, 1, 1]
    assert m[1, 1:].int().tolist() == [[1, 0, 0, 0, 0]] * 2  # padding rows see key 0 only
    assert b.last_token_index_B.tolist() == [2, 3]
    w = ForwardBatch.build([4], [0], "cpu", sliding_window=2).attn_mask_B1QL[0, 0]
    assert w.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_forward_batch_refuses_empty_requests():
    with pytest.raises(ValueError, match="at least one token"):
        ForwardBatch.build([2, 0], [0, 0], "cpu")


def test_kv_cache_rows_subset():
    cache = KVCache(1, num_rows=3, max_len=4, num_kv_heads=1, head_dim=2,
                    dtype=torch.float32, device="cpu")
    b = ForwardBatch.build([1, 1], [0, 2], "cpu", cache_rows=[2, 0])
    k = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])
    keys, _ = cache.write_and_read(0, b, k, k)
    assert cache.k[0][2, 0].tolist() == [[1.0, 1.0]] and cache.k[0][0, 2].tolist() == [[2, 2]]
    assert keys.shape == (2, 1, 3, 2) and keys[1, 0, 2].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        cache.check(ForwardBatch.build([5], [0], "cpu"))


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


def test_attention_never_uses_cudnn_and_matches_math(monkeypatch):
    """Decode changes the kv length every step; cuDNN attention would build a plan for each
    (70-110 ms per step on an H100), so ``_attend`` must run with cuDNN off. The grouped-query
    stacking must still equal plain per-head attention."""
    import torch.nn.functional as F

    from moelora_dist.models import attention as attn_mod

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    cfg = ModelConfig.from_dict(dict(model_type="qwen3_moe", vocab_size=16, hidden_size=16,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=8, num_hidden_layers=1))
    layer = attn_mod.TPAttention.__new__(attn_mod.TPAttention)
    layer.cfg, layer.split = cfg, HeadSplit.for_rank(cfg, 1, 0)
    layer.window, layer.w = None, {}  # no per-layer window, no sinks
    g = torch.Generator().manual_seed(0)
    for new, prefix in (([1, 1], [3, 6]), ([3, 1], [2, 4])):  # decode, then mixed prefill
        b = ForwardBatch.build(new, prefix, "cpu")
        T, L = sum(new), b.max_kv
        q = torch.randn(T, 4, 8, generator=g)
        k, v = torch.randn(2, 2, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
        got = layer._attend(q, k, v, b)
        for t in range(T):
            r, j = int(b.req_T[t]), int(b.j_T[t])
            mask = b.attn_mask_B1QL[r, 0, j]
            for h in range(4):
                kh = h // 2  # two query heads per kv head
                s = (k[r, kh] @ q[t, h]) * 8 ** -0.5
                p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=0)
                torch.testing.assert_close(got[t, h], p @ v[r, kh], atol=1e-5, rtol=1e-5)
    assert seen and not any(seen)
