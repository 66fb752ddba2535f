"""The dense-LoRA expand fused into its per-token consumers (Triton interpreter): the page
write for q/k/v (``paged_attention.ops.rope_write(..., lora=)``) and the residual add + norm
for o (``norm.ops.add_rms_norm(..., lora=)``), against the reference chain (the delta added by
``dense_lora.naive`` first, then the consumer's reference) and against the unfused Triton
chain (``dense_expand`` then the plain consumer kernel).

Cases: tokens without a slot, a slot of rank 0, a disabled slot (the shrink plan leaves their
rows unwritten: the poisoned allocations would show a read), mixed ranks, the shrink split into
several partials, a kv ``b`` that is a row slice of a replicated one, GQA heads and a head
count that is no multiple of the kernel's head group, a hidden size of several column steps
with a ragged last one, padding tokens with no page slot.
"""

from __future__ import annotations

import pytest
import torch

from moelora_dist.kernels.dense_lora import naive as dense_naive
from moelora_dist.kernels.dense_lora import ops as dense_ops
from moelora_dist.kernels.norm import naive as norm_naive
from moelora_dist.kernels.norm import ops as norm_ops
from moelora_dist.kernels.paged_attention import naive as pa_naive
from moelora_dist.kernels.paged_attention import ops as pa_ops

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

S, R = 5, 16
RANK = torch.tensor([R, 8, 0, R, 4], dtype=torch.int32)  # slot 2: rank 0
ENABLED = torch.tensor([True, True, True, False, True])  # slot 3: disabled


def _factors(g, I, outs, dtype):
    a = [torch.randn(S, R, I, generator=g).to(dtype) * 0.3 for _ in outs]
    b = [torch.randn(S, o, R, generator=g).to(dtype) * 0.3 for o in outs]
    for t in a + b:
        for s_, r in enumerate(RANK.tolist()):  # past a slot's rank: zero, as the pool writes
            if t.shape[1] == R:
                t[s_, r:] = 0
            else:
                t[s_, :, r:] = 0
    return a, b


def _slots(g, T):
    slot_T = torch.randint(-1, S, (T,), generator=g).to(torch.int32)
    slot_T[0] = 0 if T > 0 else slot_T[0]  # at least one token with a live adapter
    return slot_T


def _reference_slots(slot_T):
    """What the reference sees: a disabled slot's tokens have no adapter."""
    off = (slot_T >= 0) & ~ENABLED[slot_T.clamp(min=0).long()]
    return torch.where(off, torch.full_like(slot_T, -1), slot_T)


def _token_lora(x, a, b_list, slot_T, split_k):
    plan = dense_ops.plan_tokens(slot_T, ENABLED, RANK)
    shrink = dense_ops.dense_shrink(x, a, RANK, plan, split_k)[0]
    return dense_ops.TokenLoRA(shrink, b_list, slot_T, ENABLED, RANK), plan


TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_norm", [False, True], ids=["no_norm", "head_norm"])
@pytest.mark.parametrize("T,split_k", [(1, 1), (7, 3), (19, 2)], ids=["T1", "T7s3", "T19s2"])
def test_page_write_with_fused_qkv_expand(dtype, head_norm, T, split_k):
    g = torch.Generator().manual_seed(T * 7 + split_k)
    Nq, Nk, D, H, P, PS = 6, 2, 16, 40, 8, 4  # 6 query heads: one group of 4 and a ragged one
    Nk_full = 4  # the pool's kv b is replicated: this rank's rows are a slice
    x = torch.randn(T, H, generator=g).to(dtype)
    a, b = _factors(g, H, (Nq * D, Nk_full * D, Nk_full * D), dtype)
    rows = slice(Nk * D, 2 * Nk * D)  # this rank's kv head(s) of the replicated b
    b_list = [b[0], b[1][:, rows], b[2][:, rows]]
    qkv = torch.randn(T, (Nq + 2 * Nk) * D, generator=g).to(dtype)
    q, k, v = qkv.split([Nq * D, Nk * D, Nk * D], dim=1)
    slot_T = _slots(g, T)
    pos = torch.randint(0, 30, (T,), generator=g)
    page_slots = torch.randperm(P * PS, generator=g)[:T]
    if T > 2:
        page_slots[2] = -1  # a padding token: no page write (its q is still computed)
    cos, sin = pa_naive.rope_tables(D, 1e4, 32)
    w = [(1 + 0.1 * torch.randn(D, generator=g)).to(dtype) for _ in range(2)] if head_norm \
        else [None, None]

    def views(t):
        return [u.view(T, -1, D) for u in t.split([Nq * D, Nk * D, Nk * D], dim=1)]

    # reference: the delta added by the reference expand, then the reference page write
    ref = qkv.clone()
    dense_naive.add_dense_lora(list(ref.split([Nq * D, Nk * D, Nk * D], dim=1)), x, a, b_list,
                               _reference_slots(slot_T), RANK)
    pages_ref = [torch.full((P, PS, Nk, D), 7.0, dtype=dtype) for _ in range(2)]
    want = pa_naive.rope_write(*views(ref), pos, cos, sin, page_slots, *pages_ref, *w)

    # the unfused Triton chain: dense_expand into the projection, then the plain page write
    lora, plan = _token_lora(x, a, b_list, slot_T, split_k)
    unf = qkv.clone()
    dense_ops.dense_expand(list(unf.split([Nq * D, Nk * D, Nk * D], dim=1)), b_list,
                           [lora.shrink], RANK, plan)
    pages_unf = [torch.full((P, PS, Nk, D), 7.0, dtype=dtype) for _ in range(2)]
    q_unf = pa_ops.rope_write(*views(unf), pos, cos, sin, page_slots, *pages_unf, *w)

    # fused
    pages = [torch.full((P, PS, Nk, D), 7.0, dtype=dtype) for _ in range(2)]
    got = pa_ops.rope_write(q.view(T, Nq, D), k.view(T, Nk, D), v.view(T, Nk, D), pos, cos, sin,
                            page_slots, *pages, *w, lora=lora)
    assert torch.equal(qkv, torch.cat([q, k, v], 1))  # the base projection is only read
    tol = TOL[dtype] * 2
    for ours in ((got, pages), (q_unf, pages_unf)):
        torch.testing.assert_close(ours[0].float(), want.float(), atol=tol, rtol=tol)
        for p, pr in zip(ours[1], pages_ref):
            torch.testing.assert_close(p.float(), pr.float(), atol=tol, rtol=tol)
    # the deltas matter: without them the queries differ
    plain = pa_ops.rope_write(q.view(T, Nq, D), k.view(T, Nk, D), v.view(T, Nk, D), pos, cos,
                              sin, page_slots, *[p.clone() for p in pages], *w)
    assert (got - plain).abs().amax() > 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,split_k", [(1, 40, 1), (9, 600, 3)], ids=["T1H40", "T9H600s3"])
def test_residual_norm_with_fused_o_expand(dtype, T, H, split_k, monkeypatch):
    monkeypatch.setattr(norm_ops, "LORA_BLOCK_C", 256)  # 600 columns: 3 steps, the last ragged
    g = torch.Generator().manual_seed(T + H)
    I = 48
    x = torch.randn(T, I, generator=g).to(dtype)  # o's input (the attention output)
    a, b = _factors(g, I, (H,), dtype)
    o = torch.randn(T, H, generator=g).to(dtype)  # o's base output
    h0 = torch.randn(T, H, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    slot_T = _slots(g, T)

    ref_o = o.clone()
    dense_naive.add_dense_lora([ref_o], x, a, b, _reference_slots(slot_T), RANK)
    h_ref = h0.clone()
    want = norm_naive.add_rms_norm(h_ref, ref_o, weight, 1e-6)

    lora, plan = _token_lora(x, a, b, slot_T, split_k)
    unf_o = o.clone()
    dense_ops.dense_expand([unf_o], b, [lora.shrink], RANK, plan)
    h_unf = h0.clone()
    want_unf = norm_ops.add_rms_norm(h_unf, unf_o, weight, 1e-6)

    h = h0.clone()
    got = norm_ops.add_rms_norm(h, o, weight, 1e-6, lora=lora)
    tol = TOL[dtype] * 2
    for hh, out in ((h, got), (h_unf, want_unf)):
        torch.testing.assert_close(hh.float(), h_ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    live = _reference_slots(slot_T) >= 0
    live &= RANK[slot_T.clamp(min=0).long()] > 0
    h_plain = h0.clone()
    norm_ops.add_rms_norm(h_plain, o, weight, 1e-6)
    assert torch.equal(h[~live], h_plain[~live])  # no adapter: exactly the plain kernel's h
    assert (h[live].float() - h_plain[live].float()).abs().amax() > 10 * tol


def test_fused_consumers_refuse_wrong_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    a, b = _factors(g, 8, (8, 8), torch.float32)
    slot_T = torch.tensor([0, 1, -1], dtype=torch.int32)
    lora, _ = _token_lora(x, a, b, slot_T, 1)
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="one module"):
        norm_ops.add_rms_norm(h, torch.randn(3, 8), torch.ones(8), 1e-6, lora=lora)
    q = torch.randn(3, 2, 4)
    pages = torch.zeros(4, 4, 1, 4)
    cos, sin = pa_naive.rope_tables(4, 1e4, 8)
    with pytest.raises(ValueError, match="3 modules"):
        pa_ops.rope_write(q, q[:, :1], q[:, :1], torch.zeros(3, dtype=torch.long), cos, sin,
                          torch.tensor([0, 1, 2]), pages, pages.clone(), lora=lora)


def _tiny_model(backend: str):
    from benchmarks.engine.shapes import TINY, random_adapter
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups

    cfg = ModelConfig.from_dict(dict(TINY, num_hidden_layers=2))
    dev = torch.device("cpu")
    model = MoELoRAModel.build(cfg, ParallelGroups.single(dev),
                               RandomWeights(cfg, torch.float32, dev, std=0.2),
                               dtype=torch.float32, max_loras=4, max_rank=16, progress=False,
                               backend=backend, max_positions=64)
    for i in range(3):  # ranks 16, 8, 16 (mixed) in slots 0..2
        model.pool.load(random_adapter(f"a{i}", cfg, 8 if i == 1 else 16, dev, 100 + i))
    return cfg, model


def _decode_step(cfg, model, slots: list[int]):
    from moelora_dist.lora.batch_info import build_batch_info
    from moelora_dist.models.batch import ForwardBatch

    B, ctx, page = len(slots), 5, 4
    n = -(-(ctx + 1) // page)
    cache = model.new_cache(B * n, page)
    batch = ForwardBatch.build([ctx + 1] * B, [0] * B,
                               [list(range(b * n, (b + 1) * n)) for b in range(B)], page,
                               model.device)
    ids = torch.randint(0, cfg.vocab_size, (B * (ctx + 1),),
                        generator=torch.Generator().manual_seed(5))
    info = build_batch_info(batch.seg_indptr_B1, torch.tensor(slots, dtype=torch.int32),
                            model.pool.slot_rank_S)
    return model.forward(ids, batch, cache, info)


def test_model_with_fused_expand_matches_reference_and_launches_less(monkeypatch):
    """A tiny Qwen3-MoE (fp32, the Triton backend under the interpreter) with adapters in
    some sequences: with FUSE_EXPAND its hidden states equal the reference backend's and
    the unfused Triton path's, and the forward runs two ``dense_expand`` launches fewer per
    layer (q/k/v's and o's)."""
    from moelora_dist.kernels.dense_lora import ops as dl_ops
    from moelora_dist.models import lora_linear

    slots = [0, -1, 1, 2]
    cfg, ref_model = _tiny_model("torch")
    want = _decode_step(cfg, ref_model, slots)
    _, model = _tiny_model("triton")
    counts = {}
    real = dl_ops.dense_expand
    monkeypatch.setattr(dl_ops, "dense_expand", lambda *a, **k: counts.__setitem__(
        "expand", counts.get("expand", 0) + 1) or real(*a, **k))
    results = {}
    for fuse in (False, True):
        monkeypatch.setattr(lora_linear, "FUSE_EXPAND", fuse)
        counts.clear()
        results[fuse] = _decode_step(cfg, model, slots)
        results[fuse, "expand"] = counts.get("expand", 0)
    assert results[False, "expand"] == 2 * cfg.num_layers  # q/k/v and o, each layer
    assert results[True, "expand"] == 0
    for fuse in (False, True):
        torch.testing.assert_close(results[fuse], want, atol=2e-4, rtol=2e-4)
    # the adapters matter here: base-only differs
    plain = _decode_step(cfg, ref_model, [-1] * len(slots))
    assert (plain - want).abs().amax() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H", [(1, 64), (13, 600)], ids=["T1", "T13H600"])
def test_residual_norm_with_fused_topk_sum(dtype, T, H):
    """``add_topk_rms_norm`` = ``topk_sum`` then ``add_rms_norm``, bit for bit; pair rows of
    invalid experts (-1, or not on this rank) hold poison and are never read."""
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops
    from moelora_dist.kernels.moe_gemm.pairs import PairOutputs

    g = torch.Generator().manual_seed(T * H)
    K, E = 4, 6
    ids = torch.randint(-1, E + 2, (T, K), generator=g).to(torch.int32)  # E, E+1: off rank
    out = torch.randn(T * K, H, generator=g).to(dtype)
    bad = ((ids < 0) | (ids >= E)).reshape(-1)
    out[bad] = float("nan")
    h0 = torch.randn(T, H, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    pairs = PairOutputs(out, ids, E)
    h_want = h0.clone()
    want = norm_ops.add_rms_norm(h_want, gemm_ops.topk_sum(out, ids, E), w, 1e-6)
    h = h0.clone()
    got = norm_ops.add_topk_rms_norm(h, pairs, w, 1e-6)
    assert torch.equal(h, h_want) and torch.equal(got, want)
    assert torch.equal(pairs.sum(), gemm_ops.topk_sum(out, ids, E))
    # with a layer's shared-expert output added (as y + shared)
    shared = torch.randn(T, H, generator=g).to(dtype)
    h_want = h0.clone()
    want = norm_ops.add_rms_norm(h_want, gemm_ops.topk_sum(out, ids, E) + shared, w, 1e-6)
    h = h0.clone()
    got = norm_ops.add_topk_rms_norm(h, pairs._replace(plus_TH=shared), w, 1e-6)
    assert torch.equal(h, h_want) and torch.equal(got, want)
    with pytest.raises(ValueError, match="added output"):
        norm_ops.add_topk_rms_norm(h, pairs._replace(plus_TH=shared[:-1]), w, 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        norm_ops.add_topk_rms_norm(h, PairOutputs(out[:-1], ids, E), w, 1e-6)


def _with_and_without_topk_fusion(cfg, model, slots, monkeypatch):
    """One step with FUSE_TOPK_SUM off and one with it on: the same hidden states bit for bit,
    no ``topk_sum`` launch with it, one per MoE layer without."""
    from moelora_dist.kernels.moe_gemm import ops as gemm_ops
    from moelora_dist.models import model as model_mod

    calls = []
    real = gemm_ops.topk_sum
    monkeypatch.setattr(gemm_ops, "topk_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, sums = {}, {}
    for fuse in (False, True):
        monkeypatch.setattr(model_mod, "FUSE_TOPK_SUM", fuse)
        calls.clear()
        out[fuse] = _decode_step(cfg, model, slots)
        sums[fuse] = len(calls)
    assert sums == {False: len(cfg.moe_layers), True: 0}
    assert torch.equal(out[True], out[False])


def test_model_with_fused_topk_sum_is_bitwise_and_launches_less(monkeypatch):
    """FUSE_TOPK_SUM on the tiny model (Triton backend, interpreter, adapters in some
    sequences): the same hidden states bit for bit, no ``topk_sum`` launch (one per MoE
    layer without it)."""
    cfg, model = _tiny_model("triton")
    _with_and_without_topk_fusion(cfg, model, [0, -1, 1, 2], monkeypatch)


def test_fused_topk_sum_with_shared_experts_is_bitwise(monkeypatch):
    """GLM-4.5's layout (a dense first layer, a shared expert in every MoE layer; Triton
    backend, interpreter): FUSE_TOPK_SUM gives the same hidden states bit for bit, the shared
    output added inside the norm, and no ``topk_sum`` launch."""
    from moelora_dist.config.model import ModelConfig
    from moelora_dist.models.model import MoELoRAModel
    from moelora_dist.models.weights import RandomWeights
    from moelora_dist.parallel.groups import ParallelGroups
    from tests.family_configs import RAW

    cfg = ModelConfig.from_dict(RAW["glm4_moe"])
    dev = torch.device("cpu")
    model = MoELoRAModel.build(cfg, ParallelGroups.single(dev),
                               RandomWeights(cfg, torch.float32, dev, std=0.2),
                               dtype=torch.float32, max_loras=2, max_rank=8, progress=False,
                               backend="triton", max_positions=64)
    assert any("shared" in layer for layer in model.layers)
    _with_and_without_topk_fusion(cfg, model, [-1, -1, -1], monkeypatch)
