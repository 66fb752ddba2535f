"""The LoRA slot pool: zero-the-slot writes, validation before writing, LRU, pins, memory."""

import pytest
import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.lora.pool import (DenseModuleSpec, LoRAPool, MoELayerSpec, PoolConfig,
                                    PoolError)
from moelora_dist.testing.simulate import random_moe_lora
from moelora_dist.parallel.layout import Layout, RankLayout

E, H, I = 4, 8, 12
MOE = {0: MoELayerSpec(E, H, I), 1: MoELayerSpec(E, H, I)}
DENSE = {"layers.0.self_attn.q_proj": DenseModuleSpec(H, 16, "column"),
         "layers.0.self_attn.o_proj": DenseModuleSpec(16, H, "row"),
         "layers.2.mlp.gate_proj": DenseModuleSpec(H, 6, "replicated")}
FULL = RankLayout.single()
TP4_EP2_RANK3 = RankLayout(Layout(4, 4, 2), 3)


def _dense(in_dim, out_dim, r, g, scaling=0.5):
    return LoRAFactors(torch.randn(1, r, in_dim, generator=g, dtype=torch.float64),
                       torch.randn(1, out_dim, r, generator=g, dtype=torch.float64), scaling)


def _adapter(name, r, *, layers=(0, 1), dense=tuple(DENSE), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    moe = {i: random_moe_lora(E, H, I, r, g, **kw) for i in layers}
    dense_f = {p: _dense(DENSE[p].in_dim, DENSE[p].out_dim, r, g) for p in dense}
    return CanonicalAdapter(name, moe=moe, dense=dense_f)


def _pool(rank_layout=FULL, S=2, R=64, outer_shared_only=False, dense=True):
    cfg = PoolConfig(max_loras=S, max_rank=R, dtype=torch.float64,
                     outer_shared_only=outer_shared_only)
    return LoRAPool(cfg, rank_layout, MOE, DENSE if dense else {})


def _snapshot(pool):
    return {k: t.clone() for k, t in pool._all_tensors().items()}


def _slot_state(pool, slot):
    return {k: t[slot] for k, t in pool._all_tensors().items()}


@pytest.mark.parametrize("rank_layout", [FULL, TP4_EP2_RANK3], ids=["full", "tp4-ep2-rank3"])
@pytest.mark.parametrize("big_shared", [False, True], ids=["per-expert-then-shared",
                                                           "shared-then-per-expert"])
def test_evicted_rank64_leaves_no_trace_in_rank8_tenant(rank_layout, big_shared):
    # big: rank 64, every layer, projection and dense module; small: rank 8, one layer, two
    # projections, one dense module, the other outer format (so shared flags must change).
    big = _adapter("big", 64, shared_outer=big_shared, seed=1)
    small = _adapter("small", 8, layers=(1,), dense=("layers.0.self_attn.o_proj",),
                     projections=("gate", "down"), shared_outer=not big_shared, seed=2)
    pool = _pool(rank_layout)
    assert pool.load(big) == 0
    assert pool.load(_adapter("other", 4, seed=3)) == 1
    pool.load(_adapter("other", 4))  # touch: "big" is now least recently used
    assert pool.load(small) == 0 and pool.slot_of("big") is None
    fresh = _pool(rank_layout)
    assert fresh.load(small) == 0
    got, want = _slot_state(pool, 0), _slot_state(fresh, 0)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(pool.slot_rank_S[0]) == 8
    assert int(pool.moe_buffers(0).slot_rank[0]) == 0  # layer 0 untargeted -> empty
    assert bool(pool.moe_buffers(1).gate_up_a_shared[0]) == (not big_shared)
    assert not bool(pool.moe_buffers(0).gate_up_a_shared[0])  # untargeted layer: reset


def _bad_adapters():
    g = torch.Generator().manual_seed(7)
    ok = lambda name: _adapter(name, 4, seed=5)
    out = {}
    a = ok("rank_too_big"); a.moe[1] = random_moe_lora(E, H, I, 65, g)
    out["rank_too_big"] = (a, "rank 65 exceeds the pool's max_rank=64")
    a = ok("wrong_hidden"); a.moe[1] = random_moe_lora(E, H + 1, I, 4, g)
    out["wrong_hidden"] = (a, r"MoE layer 1 gate: lora A has shape \[4, 4, 9\]")
    a = ok("wrong_i_last_layer"); a.moe[1] = random_moe_lora(E, H, I + 2, 4, g, projections=("down",))
    out["wrong_i_last_layer"] = (a, r"MoE layer 1 down: lora A has shape \[4, 4, 14\]")
    a = ok("unknown_layer"); a.moe[5] = random_moe_lora(E, H, I, 4, g)
    out["unknown_layer"] = (a, r"targets MoE layer 5, but the pool has MoE layers \[0, 1\]")
    a = ok("unknown_module"); a.dense["layers.9.self_attn.k_proj"] = _dense(H, 16, 4, g)
    out["unknown_module"] = (a, "targets dense module 'layers.9.self_attn.k_proj'")
    a = ok("expert_count"); a.moe[1] = random_moe_lora(2 * E, H, I, 4, g)
    out["expert_count"] = (a, "MoE layer 1: 8 experts, but the model layer has 4")
    a = ok("nan"); a.moe[1].down.b[0, 0, 0] = float("nan")
    out["nan"] = (a, "MoE layer 1 down: lora B holds NaN or Inf")
    a = ok("neg_inf"); a.dense["layers.0.self_attn.o_proj"].a[0, 1, 2] = float("-inf")
    out["neg_inf"] = (a, "module 'layers.0.self_attn.o_proj': lora A holds NaN or Inf")
    a = ok("rank_mismatch"); a.moe[0].up = LoRAFactors(a.moe[0].up.a, a.moe[0].up.b[..., :3], 1.0)
    out["rank_mismatch"] = (a, "MoE layer 0 up: A has rank 4 but B has rank 3")
    a = ok("dense_dims"); a.dense["layers.2.mlp.gate_proj"] = _dense(H, 7, 4, g)
    out["dense_dims"] = (a, r"module 'layers.2.mlp.gate_proj': lora B has shape \[1, 7, 4\]")
    a = ok("rank_zero"); a.dense["layers.2.mlp.gate_proj"] = _dense(H, 6, 0, g)
    out["rank_zero"] = (a, "rank 0 factors")
    return out


BAD = _bad_adapters()


@pytest.mark.parametrize("case", list(BAD))
def test_failed_load_leaves_every_buffer_byte_identical(case):
    adapter, needle = BAD[case]
    pool = _pool(TP4_EP2_RANK3)
    pool.load(_adapter("first", 64, seed=1))
    pool.load(_adapter("second", 3, seed=2))  # full: a load would have to evict "first"
    before, names = _snapshot(pool), pool.loaded()
    with pytest.raises(PoolError, match=needle):
        pool.load(adapter)
    after = pool._all_tensors()
    for k, t in before.items():
        assert torch.equal(t.view(torch.uint8), after[k].view(torch.uint8)), k
    assert pool.loaded() == names
    assert pool.load(_adapter("third", 2)) == 0  # LRU order untouched: "first" goes


def test_outer_shared_only_pool_refuses_per_expert_and_stores_one_copy():
    pool = _pool(S=2, R=8, outer_shared_only=True, dense=False)
    shared = _adapter("shared", 4, dense=(), shared_outer=True, seed=4)
    per_expert = _adapter("per_expert", 4, dense=())
    with pytest.raises(PoolError, match="gate: A is per-expert .* outer_shared_only"):
        pool.load(per_expert)
    slot = pool.load(shared)
    buf = pool.moe_buffers(0)
    assert buf.gate_up_a.shape == (2, 1, 16, H) and buf.down_b.shape == (2, 1, H, 8)
    assert bool(buf.gate_up_a_shared.all()) and bool(buf.down_b_shared.all())
    layer = shared.moe[0]
    assert torch.equal(buf.gate_up_a[slot, 0, :4], layer.gate.a[0])
    assert torch.equal(buf.gate_up_a[slot, 0, 8:12], layer.up.a[0])
    torch.testing.assert_close(buf.down_b[slot, 0, :, :4], layer.down.b[0] * layer.down.scaling)
    pool.unload("shared")
    assert bool(buf.gate_up_a_shared.all())  # an empty slot of this pool still reads expert 0


def test_lru_order_and_same_name_returns_slot():
    pool = _pool(S=3, R=4, dense=False)
    ads = {n: _adapter(n, 2, dense=(), seed=i) for i, n in enumerate("abcde")}
    assert [pool.load(ads[n]) for n in "abc"] == [0, 1, 2]
    assert pool.load(ads["a"]) == 0  # already loaded: same slot, now most recent
    assert pool.load(ads["d"]) == 1 and pool.slot_of("b") is None  # b was least recent
    pool.prepare_batch(["c"], ads)  # a batch use counts as a use
    pool.release_batch()
    assert pool.load(ads["e"]) == 0 and pool.loaded() == {"e": 0, "d": 1, "c": 2}


def test_pins_block_eviction_until_release():
    pool = _pool(S=2, R=4, dense=False)
    ads = {n: _adapter(n, 2, dense=(), seed=i) for i, n in enumerate("abc")}
    req = pool.prepare_batch(["a", None, "b", "a"], ads)
    assert req.dtype == torch.int32 and req.tolist() == [0, -1, 1, 0]
    assert pool.pinned == {0, 1}
    with pytest.raises(PoolError, match="all 2 slots are pinned .* release_batch"):
        pool.load(ads["c"])
    with pytest.raises(PoolError, match="in use by the running batch"):
        pool.unload("a")
    pool.release_batch()
    assert pool.load(ads["c"]) == 0  # a was touched before b in the batch -> LRU
    with pytest.raises(PoolError, match="3 distinct adapters but the pool has max_loras=2"):
        pool.prepare_batch(["a", "b", "c"], ads)
    with pytest.raises(PoolError, match=r"\['zz'\] that are neither loaded nor in the registry"):
        pool.prepare_batch(["zz"], ads)
    with pytest.raises(PoolError, match="registry key 'x' holds an adapter named 'a'"):
        pool.prepare_batch(["x"], {"x": ads["a"]})


def test_failed_prepare_batch_drops_its_pins():
    pool = _pool(S=2, R=4, dense=False)
    ads = {n: _adapter(n, 2, dense=(), seed=i) for i, n in enumerate("ab")}
    ads["bad"] = _adapter("bad", 5, dense=())  # rank 5 > max_rank 4
    pool.load(ads["a"])
    with pytest.raises(PoolError, match="rank 5 exceeds"):
        pool.prepare_batch(["a", "bad"], ads)
    assert pool.pinned == frozenset()


def test_unload_zeroes_and_frees_the_slot():
    pool = _pool(TP4_EP2_RANK3, S=2, R=8)
    pool.load(_adapter("a", 8))
    pool.unload("a")
    assert pool.loaded() == {} and int(pool.slot_rank_S[0]) == 0
    fresh = _pool(TP4_EP2_RANK3, S=2, R=8)
    for k, t in fresh._all_tensors().items():
        assert torch.equal(pool._all_tensors()[k], t), k
    with pytest.raises(PoolError, match="adapter 'a' is not loaded"):
        pool.unload("a")


def test_dense_buffers_hold_the_rank_local_slice_with_scaling():
    rl = RankLayout(Layout(2, 2, 1), 1)
    pool = _pool(rl, S=2, R=8)
    ad = _adapter("a", 3)
    slot = pool.load(ad)
    q, o = ad.dense["layers.0.self_attn.q_proj"], ad.dense["layers.0.self_attn.o_proj"]
    qb, ob = pool.dense_buffers("layers.0.self_attn.q_proj"), pool.dense_buffers("layers.0.self_attn.o_proj")
    assert qb.b.shape == (2, 8, 8) and ob.a.shape == (2, 8, 8)  # out 16/2, in 16/2
    torch.testing.assert_close(qb.b[slot, :, :3], q.scaling * q.b[0, 8:16], rtol=0, atol=0)
    assert torch.equal(qb.a[slot, :3], q.a[0]) and not qb.a[slot, 3:].any()
    assert torch.equal(ob.a[slot, :3], o.a[0, :, 8:16])
    assert int(qb.slot_rank[slot]) == 3
    with pytest.raises(PoolError, match="no dense module 'nope'"):
        pool.dense_buffers("nope")
    with pytest.raises(PoolError, match=r"no MoE layer 3; MoE layers: \[0, 1\]"):
        pool.moe_buffers(3)
    assert pool.moe_shard(1) == rl.moe_shard(E, I)


def test_memory_accounting_and_table():
    rl = TP4_EP2_RANK3  # E_l = 2, I_l = 6; dense column out 16/4, row in 16/4
    S, R, el, il = 3, 8, 2, 6
    for outer, eo in ((False, el), (True, 1)):
        pool = _pool(rl, S=S, R=R, outer_shared_only=outer)
        moe = S * (eo * 2 * R * H + el * 2 * il * R + el * R * il + eo * H * R) * 8 + S * (1 + 1 + 4)
        dense = S * (R * H + 4 * R) * 8 + S * (R * 4 + H * R) * 8 + S * (R * H + 6 * R) * 8 + 3 * S * 4
        assert pool.nbytes() == 2 * moe + dense + S * 4
    pool = _pool(rl, S=S, R=R)
    pool.load(_adapter("a", 8))
    text = pool.describe()
    assert f"{pool.nbytes():,}" in text and "per slot" in text
    assert "moe.*.gate_up_b" in text and "[3, 2, 12, 8]" in text
    assert "slot 0: a (rank 8)" in text


def test_config_errors():
    with pytest.raises(PoolError, match="max_loras must be a positive integer"):
        PoolConfig(max_loras=0, max_rank=8)
    with pytest.raises(PoolError, match="split is 'colwise'"):
        DenseModuleSpec(8, 8, "colwise")
    with pytest.raises(PoolError, match="MoE layer 0: num_experts=4 is not divisible by ep=8"):
        LoRAPool(PoolConfig(1, 4), RankLayout(Layout(8, 8, 8), 0), {0: MoELayerSpec(4, 8, 8)})
    with pytest.raises(PoolError, match="cannot be split over tp=4: 6 is not divisible"):
        LoRAPool(PoolConfig(1, 4), RankLayout(Layout(4, 4, 1), 0), {},
                 {"x": DenseModuleSpec(8, 6, "column")})
    with pytest.raises(PoolError, match="expected a CanonicalAdapter, got dict"):
        _pool().load({"name": "x"})


def _merged(layer: MoELayerLoRA, w_gu, w_d):
    """``W + s B A`` per expert in fp64 (LoRAFactors.delta rounds to fp32)."""
    def d(f, e, shape):
        if f is None:
            return torch.zeros(shape, dtype=torch.float64)
        return f.scaling * f.b[0 if f.b_shared else e] @ f.a[0 if f.a_shared else e]
    gu = torch.stack([torch.cat([d(layer.gate, e, (I, H)), d(layer.up, e, (I, H))]) for e in range(E)])
    return w_gu + gu, w_d + torch.stack([d(layer.down, e, (H, I)) for e in range(E)])


def test_pool_with_reference_matches_merged_weights_for_mixed_batch():
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.moe.router import route

    kinds = {"per_expert": {}, "shared_outer": dict(shared_outer=True),
             "fused": dict(shared_gate_up_a=True), "mixed": dict(gate_a_shared_only=True),
             "down_only": dict(projections=("down",)), "gate_only": dict(projections=("gate",))}
    ads = {n: _adapter(n, 2 + i, dense=(), seed=10 + i, **kw) for i, (n, kw) in enumerate(kinds.items())}
    for layer in ads["gate_only"].moe.values():  # inner factors shared too: broadcast at load
        layer.gate.b = layer.gate.b[:1].clone()
    pool = _pool(S=len(ads), R=8, dense=False)
    pool.load(_adapter("old", 8, dense=(), seed=99))  # evicted below
    g = torch.Generator().manual_seed(0)
    T = 14
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w_gu = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64)
    w_d = torch.randn(E, H, I, generator=g, dtype=torch.float64)
    tw, tid = route(torch.randn(T, E, generator=g), 2, renormalize=False)
    names = [None, *kinds, "per_expert", None, "shared_outer", "mixed", "fused", None, "gate_only"]
    req = pool.prepare_batch(names, ads)
    assert pool.slot_of("old") is None
    buf = pool.moe_buffers(1)
    s_shared, s_mixed = pool.slot_of("shared_outer"), pool.slot_of("mixed")
    assert bool(buf.gate_up_a_shared[s_shared]) and not buf.gate_up_a[s_shared, 1:].any()
    assert not bool(buf.gate_up_a_shared[s_mixed])  # gate A shared, up A not: broadcast copy
    y = experts_reference(x, w_gu, w_d, tw.double(), tid, req, buf)
    for t, name in enumerate(names):
        mg, md = (w_gu, w_d) if name is None else _merged(ads[name].moe[1], w_gu, w_d)
        want = experts_reference(x[t:t + 1], mg, md, tw[t:t + 1].double(), tid[t:t + 1])
        torch.testing.assert_close(y[t:t + 1], want, rtol=1e-12, atol=1e-12, msg=str(name))


@pytest.mark.parametrize("tp", [2, 4])
def test_dense_lora_of_tp_ranks_matches_unsharded(tp):
    # column-parallel: rank outputs are concatenated; row-parallel: they are summed (the
    # all-reduce of the base layer carries the LoRA delta too). fp64, so exact up to rounding.
    ad = _adapter("a", 5, layers=(), seed=3)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for path in ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj"):
        f = ad.dense[path]
        xin = x[:, :f.in_dim]
        want = f.scaling * (xin @ f.a[0].T) @ f.b[0].T
        parts = []
        for rank in range(tp):
            pool = _pool(RankLayout(Layout(tp, tp, 1), rank), S=2, R=8)
            slot = pool.load(ad)
            buf = pool.dense_buffers(path)
            if DENSE[path].split == "row":
                step = f.in_dim // tp
                x_local = xin[:, rank * step:(rank + 1) * step]
            else:
                x_local = xin
            parts.append((x_local @ buf.a[slot].T) @ buf.b[slot].T)
        got = torch.cat(parts, 1) if DENSE[path].split == "column" else sum(parts)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_random_cycles_with_bad_loads_match_a_fresh_pool():
    """1,000 random cycles of load, evict (LRU), replace, unload, forward and bad loads on a
    3-slot pool sliced for rank 3 of (tp 4, ep 2). After every bad load the pool is
    byte-identical to before it; every 50 cycles (and at the end) each slot equals a fresh
    pool's slot holding the same adapter (an empty slot equals a fresh empty one); every
    forward equals the same batch on such a fresh pool."""
    from moelora_dist.kernels.moe_lora.naive import experts_reference
    from moelora_dist.lora.batch_info import build_batch_info
    from moelora_dist.moe.router import localize_topk_ids, route

    rng = torch.Generator().manual_seed(11)
    S, layout = 3, TP4_EP2_RANK3
    good = {}
    for i in range(8):
        kw = dict(shared_outer=i % 3 == 1, shared_gate_up_a=i % 3 == 2)
        layers = (0, 1) if i % 4 else (1,)
        good[f"g{i}"] = [_adapter(f"g{i}", r, layers=layers, seed=100 * i + r, **kw)
                         for r in (2, 8)]  # two versions per name: a replace changes rank
    bad = [a for a, _ in _bad_adapters().values()]
    pool = _pool(layout, S=S, R=64)
    live: dict[str, CanonicalAdapter] = {}

    def fresh_slot(adapter):
        f = _pool(layout, S=S, R=64)
        if adapter is not None:
            f.load(adapter)
        return _slot_state(f, 0)

    def check_against_fresh():
        for s in range(S):
            name = next((n for n, slot in pool.loaded().items() if slot == s), None)
            want = fresh_slot(live[name] if name else None)
            got = _slot_state(pool, s)
            for k in want:
                assert torch.equal(got[k], want[k]), (s, name, k)

    shard = pool.moe_shard(1)
    for cycle in range(1000):
        op = int(torch.randint(0, 6, (1,), generator=rng))
        if op <= 1:  # load (evicts the least recently used when full)
            name = f"g{int(torch.randint(0, 8, (1,), generator=rng))}"
            if name not in pool.loaded():
                adapter = good[name][int(torch.randint(0, 2, (1,), generator=rng))]
                pool.load(adapter)
                live[name] = adapter
                live = {n: a for n, a in live.items() if n in pool.loaded()}
        elif op == 2 and pool.loaded():  # replace: same name, other version, maybe other slot
            name = sorted(pool.loaded())[int(torch.randint(0, len(pool.loaded()), (1,),
                                                           generator=rng))]
            pool.unload(name)
            other = next(a for a in good[name] if a is not live[name])
            pool.load(other)
            live[name] = other
            live = {n: a for n, a in live.items() if n in pool.loaded()}
        elif op == 3 and pool.loaded():  # unload
            name = sorted(pool.loaded())[0]
            pool.unload(name)
            del live[name]
        elif op == 4:  # a bad load changes nothing
            before = _snapshot(pool)
            with pytest.raises(PoolError):
                pool.load(bad[int(torch.randint(0, len(bad), (1,), generator=rng))])
            after = pool._all_tensors()
            assert all(torch.equal(after[k], before[k]) for k in before)
        elif pool.loaded():  # forward of a mixed batch on layer 1 vs a fresh pool
            names = sorted(pool.loaded()) + [None]
            T = 9
            x = torch.randn(T, H, generator=rng, dtype=torch.float64)
            w, ids = route(torch.randn(T, E, generator=rng), 2, renormalize=True)
            local = localize_topk_ids(ids, shard.expert_start, shard.num_local_experts)
            who = [names[int(torch.randint(0, len(names), (1,), generator=rng))]
                   for _ in range(T)]
            seg = torch.arange(T + 1, dtype=torch.int32)
            req = pool.prepare_batch(who, live)
            info = build_batch_info(seg, req, pool.slot_rank_S)
            w_gu, w_d = _w(pool, 1)
            got = experts_reference(x, w_gu, w_d, w, local, info.token_slot_T,
                                    pool.moe_buffers(1))
            pool.release_batch()
            for t, name in enumerate(who):
                f = _pool(layout, S=S, R=64)
                if name is not None:
                    f.load(live[name])
                slot_f = torch.tensor([0 if name else -1], dtype=torch.int32)
                want = experts_reference(x[t:t + 1], w_gu, w_d, w[t:t + 1], local[t:t + 1],
                                         slot_f, f.moe_buffers(1))
                assert torch.equal(got[t:t + 1], want), (cycle, t, name)
        if cycle % 50 == 49:
            check_against_fresh()
    check_against_fresh()


def _w(pool, layer):
    """Random base expert weights ``[E_l, 2 I_l, H]``, ``[E_l, H, I_l]`` of the pool's shard
    (the same for every call: seeded by the layer)."""
    shard = pool.moe_shard(layer)
    g = torch.Generator().manual_seed(layer)
    return (torch.randn(shard.num_local_experts, 2 * shard.i_local, H, generator=g,
                        dtype=torch.float64),
            torch.randn(shard.num_local_experts, H, shard.i_local, generator=g,
                        dtype=torch.float64))
