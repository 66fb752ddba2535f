"""MoEBlock slicing and the LoRAMoE wrapper on one process (mocked ranks for the shards)."""

import pytest
import torch

from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.testing import tiny
from moelora_dist.moe.dispatch import AUTO_ALL_TO_ALL_MIN_TOKENS, auto_dispatcher_name
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import Layout, valid_layouts

CFG = tiny.TinyMoEConfig(hidden=16, intermediate=12, num_experts=8, top_k=3, num_layers=1)


def _full(dtype=torch.float64):
    return [t.to(dtype) for t in tiny.full_weights(CFG, 0)]


def _block(shard, dtype=torch.float64):
    router, gu, down = _full(dtype)
    return MoEBlock.from_full(router, gu, down, top_k=CFG.top_k, renormalize=True, shard=shard)


@pytest.mark.parametrize("layout", valid_layouts(4, CFG.num_experts, CFG.intermediate), ids=str)
def test_block_partials_over_a_tp_group_sum_to_the_full_block(layout):
    # Gate and up halves must be cut separately; cutting [E, 2I, H] rows as one block would
    # hand rank 0 only gate rows whenever moe_tp > 1, and this sum would not match.
    x = torch.randn(11, CFG.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = _block(Layout(1, 1).moe_shard(0, CFG.num_experts, CFG.intermediate))(x)
    parts = [_block(layout.moe_shard(r, CFG.num_experts, CFG.intermediate))(x)
             for r in layout.tp_groups[0]]
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-12)


def test_block_slices_by_moe_tp_rank_not_tp_rank():
    shard = Layout(4, 4, 2).moe_shard(1, CFG.num_experts, CFG.intermediate)  # moe_tp_rank 1 of 2
    block = _block(shard)
    _, gu, down = _full()
    I, half = CFG.intermediate, CFG.intermediate // 2
    torch.testing.assert_close(block.w_gate_up[:, :half], gu[:4, half:I])
    torch.testing.assert_close(block.w_gate_up[:, half:], gu[:4, I + half:])
    torch.testing.assert_close(block.w_down, down[:4, :, half:])


def _single_layer(pool=None, dispatcher="auto"):
    g = ParallelGroups.single()
    return LoRAMoE(_block(g.rank_layout.moe_shard(CFG.num_experts, CFG.intermediate)), pool, 0,
                   g, dispatcher)


def test_layer_with_pool_matches_merged_weights_per_request():
    # Independent of the pool's buffer layout: W + scaling * B @ A from the canonical adapter.
    adapters = {a.name: a for a in tiny.make_adapters(CFG)}
    names = ["per_expert_r4", None, "shared_outer_r8", "gate_up_shared_a_r2", "down_only_r6"]
    pool = tiny.make_pool(CFG, ParallelGroups.single().rank_layout, dtype=torch.float64)
    x, seg = tiny.make_requests(CFG, 30, names, 7, dtype=torch.float64)
    y = _single_layer(pool)(x, tiny.batch_info_for(pool, names, adapters, seg))
    router, gu, down = _full()
    I = CFG.intermediate

    def delta(f, e):  # fp64: LoRAFactors.delta works in fp32, too coarse for this tolerance
        a, bb = f.a[0 if f.a_shared else e].double(), f.b[0 if f.b_shared else e].double()
        return f.scaling * (bb @ a)

    for b, name in enumerate(names):
        rows = slice(int(seg[b]), int(seg[b + 1]))
        gu_m, down_m = gu.clone(), down.clone()
        lora = adapters[name].moe.get(0) if name else None
        for e in range(CFG.num_experts):
            if lora is not None and lora.gate is not None:
                gu_m[e, :I] += delta(lora.gate, e)
                gu_m[e, I:] += delta(lora.up, e)
            if lora is not None and lora.down is not None:
                down_m[e] += delta(lora.down, e)
        block = MoEBlock(router, gu_m, down_m, top_k=CFG.top_k, renormalize=True,
                         shard=_single_layer().base.shard)
        torch.testing.assert_close(y[rows], block(x[rows]), rtol=1e-10, atol=1e-10)


class _ExplodingPool:
    def moe_buffers(self, layer):
        raise AssertionError("the LoRA path must be skipped when no token uses an adapter")


def test_no_lora_token_skips_the_pool():
    x = torch.randn(5, CFG.hidden, dtype=torch.float64)
    info = BatchInfo(torch.full((5,), -1, dtype=torch.int32), torch.zeros(4, dtype=torch.bool), 0)
    y = _single_layer(_ExplodingPool())(x, info)
    torch.testing.assert_close(y, _single_layer()(x))


def test_wrapper_serves_base_attributes():
    layer = _single_layer()
    layer.base.quant_method = "fp8-test"
    assert layer.quant_method == "fp8-test"
    assert (layer.num_experts, layer.hidden_size, layer.top_k) == (8, 16, 3)
    assert layer.intermediate_size == CFG.intermediate and layer.renormalize is True
    assert layer.layer_idx == 0  # the wrapper's own attribute still wins
    with pytest.raises(AttributeError, match="no_such_attr"):
        layer.no_such_attr


def test_single_process_dispatchers_agree():
    x = torch.randn(9, CFG.hidden, dtype=torch.float64)
    outs = [_single_layer(dispatcher=d)(x) for d in
            ("all_reduce", "all_to_all", "all_to_all_static", "all_to_all_fixed",
             "ref_all_reduce", "ref_all_to_all")]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


def test_auto_dispatcher_choice():
    n = AUTO_ALL_TO_ALL_MIN_TOKENS
    assert auto_dispatcher_name(1, 4) == "all_reduce"
    assert auto_dispatcher_name(n - 1, 8) == "all_reduce"
    assert auto_dispatcher_name(n, 4) == "all_to_all"
    assert auto_dispatcher_name(10 * n, 1) == "all_reduce"  # nothing to move with ep = 1
    assert auto_dispatcher_name(10 * n, 2) == "all_reduce"  # measured faster at EP = 2


def test_bad_inputs_name_the_problem():
    g = ParallelGroups.single()
    wrong = _block(Layout(2, 2, 2).moe_shard(1, CFG.num_experts, CFG.intermediate))
    with pytest.raises(ValueError, match="build it with this rank's shard"):
        LoRAMoE(wrong, None, 0, g)
    with pytest.raises(ValueError, match="unknown dispatcher"):
        _single_layer(dispatcher="nccl_magic")
    with pytest.raises(ValueError, match=r"x must be \[T, 16\]"):
        _single_layer()(torch.zeros(3, 5, dtype=torch.float64))
    info = BatchInfo(torch.zeros(4, dtype=torch.int32), torch.ones(1, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="describes 4 tokens but x has 3"):
        _single_layer(_ExplodingPool())(torch.zeros(3, 16, dtype=torch.float64), info)
    router, gu, down = _full()
    with pytest.raises(ValueError, match="do not match the shard"):
        MoEBlock.from_full(router, gu[:, :-2], down, top_k=2, renormalize=True,
                           shard=g.rank_layout.moe_shard(8, 12))
    with pytest.raises(ValueError, match="top_k=9"):
        MoEBlock.from_full(router, gu, down, top_k=9, renormalize=True,
                           shard=g.rank_layout.moe_shard(8, 12))


def test_batch_max_rank_reaches_the_expert_computation(monkeypatch):
    """``BatchInfo.max_rank`` (the largest rank the batch's adapters use) is what the layer
    hands the expert kernels, which size their rank tiles from it."""
    from moelora_dist.moe import layer as layer_mod

    adapters = {a.name: a for a in tiny.make_adapters(CFG)}
    names = ["per_expert_r4", None, "down_only_r6"]
    pool = tiny.make_pool(CFG, ParallelGroups.single().rank_layout, dtype=torch.float64)
    x, seg = tiny.make_requests(CFG, 12, names, 3, dtype=torch.float64)
    info = tiny.batch_info_for(pool, names, adapters, seg)
    seen = []
    run = layer_mod.run_experts
    monkeypatch.setattr(layer_mod, "run_experts",
                        lambda *a, **k: seen.append(k.get("max_lora_rank")) or run(*a, **k))
    _single_layer(pool)(x, info)
    assert info.max_rank == 6 and seen == [6]
