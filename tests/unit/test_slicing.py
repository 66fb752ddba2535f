"""Rank-aware slicing: the slices of every layout put back together give the full adapter."""

import pytest
import torch

from moelora_dist.adapters.canonical import LoRAFactors, MoELayerLoRA
from moelora_dist.lora.slicing import slice_dense, slice_moe_layer
from moelora_dist.parallel.layout import Layout, RankLayout, divisors

LAYOUTS = [(tp, ep) for tp in range(1, 9) for ep in divisors(tp)]


def _layer(E, H, I, r, *, shared_outer=False, shared_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ea = 1 if shared_outer else E
    a_gate = rn(ea, r, H)
    gate = LoRAFactors(a_gate, rn(E, I, r), 0.5)
    up = LoRAFactors(a_gate if shared_a else rn(ea, r, H), rn(E, I, r), 0.25)
    down = LoRAFactors(rn(E, r, I), rn(ea, H, r), 2.0)
    return MoELayerLoRA(E, gate, up, down)


def _reassemble(layout: Layout, full: MoELayerLoRA, H: int, I: int) -> MoELayerLoRA:
    """Glue the per-rank slices of one TP group back into full tensors, checking that every
    replicated factor is identical on the ranks that hold it."""
    E = full.num_experts
    out = {p: {"a": None, "b": None} for p in ("gate", "up", "down")}
    for p, f in full.projections().items():
        out[p]["a"] = torch.full_like(f.a, float("nan"))
        out[p]["b"] = torch.full_like(f.b, float("nan"))
    for rank in layout.tp_groups[0]:
        shard = RankLayout(layout, rank).moe_shard(E, I)
        local = slice_moe_layer(full, shard)
        assert local.num_experts == shard.num_local_experts
        es = slice(shard.expert_start, shard.expert_end)
        rows = slice(shard.i_start, shard.i_end)
        for p, f in local.projections().items():
            dst = out[p]
            for key, t in (("a", f.a), ("b", f.b)):
                whole = getattr(full.projections()[p], key)
                e_sel = slice(0, 1) if whole.shape[0] == 1 else es
                if (p, key) in (("gate", "b"), ("up", "b")):
                    region = dst[key][e_sel, rows, :]
                elif (p, key) == ("down", "a"):
                    region = dst[key][e_sel, :, rows]
                else:
                    region = dst[key][e_sel]
                assert region.shape == t.shape, (p, key, region.shape, t.shape)
                # a replicated piece must be identical on each rank that holds it
                same = torch.isnan(region) | (region == t)
                assert bool(same.all()), (p, key, rank)
                region.copy_(t)
    return MoELayerLoRA(E, *(LoRAFactors(out[p]["a"], out[p]["b"], 1.0) for p in
                             ("gate", "up", "down")))


@pytest.mark.parametrize("tp, ep", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
@pytest.mark.parametrize("kind", ["per_expert", "shared_outer", "shared_gate_up_a"])
def test_slices_reassemble_to_full_adapter(tp, ep, kind):
    layout = Layout(tp, tp, ep)
    E, H, I, r = 2 * ep, 5, 3 * layout.moe_tp, 3
    full = _layer(E, H, I, r, shared_outer=kind == "shared_outer",
                  shared_a=kind == "shared_gate_up_a", seed=tp * 10 + ep)
    back = _reassemble(layout, full, H, I)
    for p, f in full.projections().items():
        g = back.projections()[p]
        assert torch.equal(g.a, f.a), (p, "a")
        assert torch.equal(g.b, f.b), (p, "b")


def test_shared_a_identity_and_views_survive_slicing():
    full = _layer(4, 6, 8, 2, shared_a=True)
    local = slice_moe_layer(full, Layout(4, 4, 2).moe_shard(3, 4, 8))
    assert local.gate.a is local.up.a
    assert local.gate_up_shared_a
    assert local.gate.b.data_ptr() == full.gate.b[2, 4:].data_ptr()  # a view, no copy


def test_tp4_ep2_slices_by_moe_tp_rank_not_tp_rank():
    # tp=4, ep=2 -> moe_tp=2. tp_rank 1 = (moe_ep_rank 0, moe_tp_rank 1): I rows [4, 8).
    # tp_rank 2 = (moe_ep_rank 1, moe_tp_rank 0): experts [2, 4), I rows [0, 4).
    # Slicing by tp_rank of tp would give rows [2, 4) and [4, 6) of size I/4 instead.
    E, H, I = 4, 6, 8
    full = _layer(E, H, I, 3)
    layout = Layout(4, 4, 2)
    expected = {1: (slice(0, 2), slice(4, 8)), 2: (slice(2, 4), slice(0, 4))}
    for rank, (es, rows) in expected.items():
        local = slice_moe_layer(full, RankLayout(layout, rank).moe_shard(E, I))
        assert torch.equal(local.gate.b, full.gate.b[es, rows])
        assert torch.equal(local.up.b, full.up.b[es, rows])
        assert torch.equal(local.down.a, full.down.a[es, :, rows])
        assert torch.equal(local.gate.a, full.gate.a[es])
        assert torch.equal(local.down.b, full.down.b[es])


def test_partial_projections_and_errors():
    full = _layer(4, 6, 8, 2)
    only_down = MoELayerLoRA(4, down=full.down)
    local = slice_moe_layer(only_down, Layout(2, 2, 1).moe_shard(1, 4, 8))
    assert local.gate is None and local.up is None and local.down.a.shape == (4, 2, 4)
    with pytest.raises(ValueError, match="has 4 experts but the shard is of a layer with 8"):
        slice_moe_layer(full, Layout(2, 2, 2).moe_shard(0, 8, 8))
    with pytest.raises(ValueError, match="intermediate dim of 8, but the layer's .* is 16"):
        slice_moe_layer(full, Layout(2, 2, 1).moe_shard(0, 4, 16))
    bad = MoELayerLoRA(4, gate=LoRAFactors(full.gate.a[:3], full.gate.b, 1.0))
    with pytest.raises(ValueError, match="gate.a has expert dim 3, expected 4"):
        slice_moe_layer(bad, Layout(1, 1, 1).moe_shard(0, 4, 8))


@pytest.mark.parametrize("tp", range(1, 9))
def test_dense_slices_reassemble(tp):
    g = torch.Generator().manual_seed(tp)
    r, d_in, d_out = 3, 2 * tp, 3 * tp
    f = LoRAFactors(torch.randn(1, r, d_in, generator=g), torch.randn(1, d_out, r, generator=g),
                    0.5)
    layout = Layout(tp, tp, 1)
    ranks = [RankLayout(layout, k) for k in range(tp)]
    col = [slice_dense(f, rl, "column") for rl in ranks]
    row = [slice_dense(f, rl, "row") for rl in ranks]
    rep = [slice_dense(f, rl, "replicated") for rl in ranks]
    assert torch.equal(torch.cat([c.b for c in col], 1), f.b)
    assert all(torch.equal(c.a, f.a) and c.scaling == 0.5 for c in col)
    assert torch.equal(torch.cat([w.a for w in row], 2), f.a)
    assert all(torch.equal(w.b, f.b) for w in row)
    assert all(torch.equal(x.a, f.a) and torch.equal(x.b, f.b) for x in rep)


def test_dense_errors():
    f = LoRAFactors(torch.zeros(1, 2, 6), torch.zeros(1, 9, 2), 1.0)
    rl = RankLayout(Layout(4, 4, 2), 1)
    with pytest.raises(ValueError, match="out_dim .*=9 is not divisible by tp=4"):
        slice_dense(f, rl, "column")
    with pytest.raises(ValueError, match="in_dim .*=6 is not divisible by tp=4"):
        slice_dense(f, rl, "row")
    with pytest.raises(ValueError, match="unknown dense split 'colwise'"):
        slice_dense(f, rl, "colwise")
