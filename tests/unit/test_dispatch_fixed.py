"""The fixed-capacity dispatcher's pieces that need no process group: the capacity rule, its
options, and the dispatcher on one process (EP 1: the share is every token, nothing moves)."""

import math

import pytest
import torch

from moelora_dist.errors import MoeloraError
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.dispatch import REGISTRY, make_dispatcher
from moelora_dist.moe.dispatch.all_to_all_fixed import AllToAllFixedDispatcher, FixedConfig
from moelora_dist.moe.dispatch.capacity import (ROUND_TO, CapacityRule, capacity_rows,
                                                need_probability)
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.testing import tiny

CFG = tiny.TinyMoEConfig(hidden=16, intermediate=12, num_experts=8, top_k=3, num_layers=1)


def test_need_probability_is_exact_for_uniform_routing():
    # Brute force over all 8-choose-2 expert pairs: a pair misses EP rank 0's two experts
    # when both experts are among the other six.
    assert need_probability(8, 2, 4) == pytest.approx(1 - 15 / 28)
    assert need_probability(128, 8, 2) == pytest.approx(1 - math.comb(64, 8) / math.comb(128, 8))
    assert need_probability(8, 7, 2) == 1.0  # 7 experts cannot all avoid 4 of 8


@pytest.mark.parametrize("E,K,P", [(128, 8, 2), (128, 8, 4), (8, 8, 8)])
def test_capacity_reaches_the_share_when_every_token_needs_every_rank(E, K, P):
    for T in (1, 5, 64, 4096, 65536):
        C0, cap = capacity_rows(T, P, K, E)
        assert (C0, cap) == (-(-T // P), -(-T // P))


def test_capacity_below_the_share_when_routing_is_sparse():
    C0, cap = capacity_rows(65536, 8, 8, 128)  # Qwen3-30B-A3B routing on EP 8
    p = need_probability(128, 8, 8)
    assert C0 == 8192 and cap % ROUND_TO == 0
    assert 1.25 * p * C0 <= cap < C0 and cap == 6976
    C0, cap = capacity_rows(16384, 4, 2, 8)  # Mixtral-like top-2 of 8 on EP 4
    p = 1 - 15 / 28
    want = math.ceil(1.25 * p * 4096 + 3 * math.sqrt(4096 * p * (1 - p)))
    assert (C0, cap) == (4096, -(-want // ROUND_TO) * ROUND_TO) == (4096, 2480)


def test_capacity_rule_edges_and_fixed_rows():
    assert capacity_rows(0, 4, 2, 8) == (0, 0)
    assert capacity_rows(3, 4, 2, 8) == (1, 1)  # T < P: shares of one token (or none)
    assert capacity_rows(100, 1, 2, 8, CapacityRule(rows=3)) == (100, 100)  # EP 1: no exchange
    assert capacity_rows(100, 4, 2, 8, CapacityRule(rows=3)) == (25, 3)
    assert capacity_rows(100, 4, 2, 8, CapacityRule(rows=300)) == (25, 25)
    assert capacity_rows(4096, 8, 2, 8, CapacityRule(factor=0.01, sigmas=0)) == (512, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(factor=0), "capacity factor must be > 0"),
    (dict(sigmas=-1), "capacity sigmas must be >= 0"),
    (dict(rows=0), "a fixed capacity must be an integer >= 1 row"),
    (dict(rows=2.5), "a fixed capacity must be an integer >= 1 row"),
])
def test_bad_capacity_options_name_the_problem(kwargs, match):
    with pytest.raises(MoeloraError, match=match):
        CapacityRule(**kwargs)


def test_bad_kernel_backend_names_the_problem():
    with pytest.raises(MoeloraError, match="unknown dispatch kernel backend 'cuda'"):
        FixedConfig(backend="cuda")


def _layer(dispatcher, pool=None, dtype=torch.float64, experts=None):
    g = ParallelGroups.single()
    shard = g.rank_layout.moe_shard(CFG.num_experts, CFG.intermediate)
    router, gu, down = (t.to(dtype) for t in tiny.full_weights(CFG, 0))
    base = MoEBlock.from_full(router, gu, down, top_k=CFG.top_k, renormalize=True, shard=shard)
    if callable(dispatcher):
        dispatcher = dispatcher(g, shard)
    return LoRAMoE(base, pool, 0, g, dispatcher, backend=experts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_tokens", [0, 1, 9, 40])
def test_single_process_fixed_dispatcher_matches_all_reduce(num_tokens, backend):
    adapters = {a.name: a for a in tiny.make_adapters(CFG)}
    names = ["per_expert_r4", None, "shared_outer_r8", "down_only_r6"] if num_tokens else [None]
    g = ParallelGroups.single()
    outs = []
    for make in ("all_reduce", lambda g, s: AllToAllFixedDispatcher(
            g, s, FixedConfig(backend=backend, capacity=CapacityRule(rows=2)))):
        pool = tiny.make_pool(CFG, g.rank_layout, dtype=torch.float64)
        x, seg = tiny.make_requests(CFG, num_tokens, names, 3, dtype=torch.float64)
        outs.append(_layer(make, pool)(x, tiny.batch_info_for(pool, names, adapters, seg)))
        pool.release_batch()
    assert outs[1].shape == (num_tokens, CFG.hidden)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)


def test_layer_takes_a_built_dispatcher_and_refuses_one_for_another_shard():
    assert REGISTRY["all_to_all_fixed"] is AllToAllFixedDispatcher
    built = []
    layer = _layer(lambda g, s: built.append(AllToAllFixedDispatcher(g, s)) or built[0])
    assert layer.dispatcher == "all_to_all_fixed" and layer.get_dispatcher(5) is built[0]
    g = ParallelGroups.single()
    other = make_dispatcher("all_to_all_fixed", g, g.rank_layout.moe_shard(4, 4))
    with pytest.raises(ValueError, match="was built for another shard or layout"):
        _layer(other)


def test_triton_experts_read_the_received_rows_in_place():
    # The fixed dispatcher hands the experts x as a view of its receive buffer (row stride =
    # the byte row, not H); the Triton experts (interpreter, fp32) must read it as the torch
    # reference reads a contiguous x.
    adapters = {a.name: a for a in tiny.make_adapters(CFG)}
    names = ["per_expert_r4", None, "shared_outer_r8"]
    g = ParallelGroups.single()
    outs = []
    for disp, experts in (("all_reduce", "torch"), ("all_to_all_fixed", "triton")):
        pool = tiny.make_pool(CFG, g.rank_layout, dtype=torch.float32)
        x, seg = tiny.make_requests(CFG, 11, names, 4, dtype=torch.float32)
        layer = _layer(disp, pool, torch.float32, experts)
        if disp == "all_to_all_fixed":
            routed = layer.get_dispatcher(11).dispatch(x, *layer.base.route(x), None)
            assert routed.x_NH.stride(0) > CFG.hidden and not routed.x_NH.is_contiguous()
        outs.append(layer(x, tiny.batch_info_for(pool, names, adapters, seg)))
        pool.release_batch()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
