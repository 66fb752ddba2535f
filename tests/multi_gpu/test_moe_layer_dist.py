"""The LoRA MoE layer on every layout of this world size matches the single-process layer.

Run under torchrun (see conftest.py). Every rank builds the same model, adapters and batch
from seeds; the reference is the same ``LoRAMoE`` class on ``ParallelGroups.single()`` with
full weights. Tolerances: fp64 on CPU differs only by summation order (1e-9 of the output
scale); on GPUs fp32 runs through Triton (TF32-class products), so 2e-2 of the scale.
"""

import os
import tempfile

import pytest
import torch

from moelora_dist.testing import tiny
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel import groups as groups_mod
from moelora_dist.parallel.groups import ParallelGroups, init_parallel
from moelora_dist.parallel.layout import LayoutError, valid_layouts

WORLD = int(os.environ.get("WORLD_SIZE", "0"))
CUDA = os.environ.get("MOELORA_DIST_BACKEND") == "nccl" or (
    os.environ.get("MOELORA_DIST_BACKEND") is None and torch.cuda.is_available())
# GPUs run the serving dtype, bf16: the Triton tile configs for fp32 ask for more shared memory
# than an H200 has (seen 2026-11-23). Partial sums rounded to bf16 per rank: 5e-2 of scale.
DTYPE = torch.bfloat16 if CUDA else torch.float64
REL_TOL = 5e-2 if CUDA else 1e-9
CFG = tiny.TinyMoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, num_layers=3)
ADAPTERS = {a.name: a for a in tiny.make_adapters(CFG)}
MIXED = ["per_expert_r4", None, "shared_outer_r8", "gate_up_shared_a_r2", None, "down_only_r6",
         "per_expert_r4"]
LAYOUTS = valid_layouts(WORLD, CFG.num_experts, CFG.intermediate) if WORLD else []
ALL_DISPATCHERS = ("all_reduce", "all_to_all", "all_to_all_static", "all_to_all_fixed",
                   "ref_all_reduce", "ref_all_to_all", "auto")
FAST = ("all_reduce", "all_to_all", "all_to_all_static", "all_to_all_fixed")
REFERENCE_OF = {"all_reduce": "ref_all_reduce", "all_to_all": "ref_all_to_all",
                "all_to_all_static": "ref_all_to_all", "all_to_all_fixed": "ref_all_to_all"}


def _id(layout):
    return f"tp{layout.tp}-ep{layout.ep}"


def _cases(dispatchers):
    return [pytest.param(lay, d, id=f"{_id(lay)}-{d}") for lay in LAYOUTS for d in dispatchers]


def _groups(layout) -> ParallelGroups:
    return init_parallel(layout.tp, layout.ep)


def _device(groups=None):
    return groups.device if groups is not None else (
        torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu"))


def _layer(groups: ParallelGroups, pool, dispatcher: str, router_EH=None,
           layer: int = 0) -> LoRAMoE:
    router, gu, down = tiny.full_weights(CFG, layer)
    if router_EH is not None:
        router = router_EH
    shard = groups.rank_layout.moe_shard(CFG.num_experts, CFG.intermediate)
    dev = groups.device
    base = MoEBlock.from_full(router.to(dev, DTYPE), gu.to(dev, DTYPE), down.to(dev, DTYPE),
                              top_k=CFG.top_k, renormalize=CFG.renormalize, shard=shard)
    return LoRAMoE(base, pool, layer, groups, dispatcher)


def _run_layer(groups, dispatcher, names, num_tokens, seed, router_EH=None):
    """Output of layer 0 on ``groups`` for one batch; pins and releases the batch."""
    pool = tiny.make_pool(CFG, groups.rank_layout, dtype=DTYPE, device=groups.device)
    x, seg = tiny.make_requests(CFG, num_tokens, names, seed, dtype=DTYPE, device=groups.device)
    info = tiny.batch_info_for(pool, names, ADAPTERS, seg)
    y = _layer(groups, pool, dispatcher, router_EH)(x, info)
    pool.release_batch()
    return y


def _single():
    return ParallelGroups.single(_device())


def _assert_close(y, ref):
    assert y.shape == ref.shape
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item() + 1e-12
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= REL_TOL * scale, f"max abs err {err:.3e} vs output scale {scale:.3e}"


@pytest.mark.parametrize("layout,dispatcher", _cases(ALL_DISPATCHERS))
def test_moe_layer_matches_unsharded(layout, dispatcher):
    y = _run_layer(_groups(layout), dispatcher, MIXED, 37, seed=1)
    _assert_close(y, _run_layer(_single(), "all_reduce", MIXED, 37, seed=1))


@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_fast_dispatcher_matches_its_reference(layout, dispatcher):
    g = _groups(layout)
    y = _run_layer(g, dispatcher, MIXED, 29, seed=2)
    _assert_close(y, _run_layer(g, REFERENCE_OF[dispatcher], MIXED, 29, seed=2))


@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_stack_matches_unsharded(layout, dispatcher):
    g = _groups(layout)
    ckpt = tiny.save_checkpoint(CFG, tempfile.mkdtemp(prefix=f"tiny-r{g.rank}-"))
    outs = []
    for groups in (g, _single()):
        pool = tiny.make_pool(CFG, groups.rank_layout, dtype=DTYPE, device=groups.device)
        stack = tiny.load_stack(CFG, ckpt, groups, pool, dispatcher=dispatcher, dtype=DTYPE)
        x, seg = tiny.make_requests(CFG, 41, MIXED, 3, dtype=DTYPE, device=groups.device)
        outs.append(stack(x, tiny.batch_info_for(pool, MIXED, ADAPTERS, seg)))
    _assert_close(*outs)


@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_uneven_routing_all_tokens_to_two_experts(layout, dispatcher):
    # Experts 0 and 1 win every token (x > 0 and their router rows dominate): one EP rank gets
    # every token, the others none, and experts 2..E-1 receive nothing.
    router = torch.zeros(CFG.num_experts, CFG.hidden)
    router[0], router[1] = 3.0, 2.0
    names = ["per_expert_r4", None, "shared_outer_r8"]

    def run(groups):
        pool = tiny.make_pool(CFG, groups.rank_layout, dtype=DTYPE, device=groups.device)
        x, seg = tiny.make_requests(CFG, 19, names, 4, dtype=DTYPE, device=groups.device)
        layer = _layer(groups, pool, dispatcher, router_EH=router)
        x = x.abs() + 0.1
        assert set(layer.base.route(x)[1].flatten().tolist()) <= {0, 1}
        return layer(x, tiny.batch_info_for(pool, names, ADAPTERS, seg))

    _assert_close(run(_groups(layout)), run(_single()))


@pytest.mark.parametrize("num_tokens", [0, 1, 3], ids=["T0", "T1", "T3-fewer-than-ranks"])
@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_fewer_tokens_than_ranks(layout, dispatcher, num_tokens):
    names = ["gate_up_shared_a_r2"] if num_tokens else [None]
    y = _run_layer(_groups(layout), dispatcher, names, num_tokens, seed=5)
    _assert_close(y, _run_layer(_single(), "all_reduce", names, num_tokens, seed=5))


@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_base_only_batch_skips_lora(layout, dispatcher):
    names = [None, None]
    y = _run_layer(_groups(layout), dispatcher, names, 23, seed=6)
    g = _groups(layout)
    x, _ = tiny.make_requests(CFG, 23, names, 6, dtype=DTYPE, device=g.device)
    no_pool = _layer(g, None, dispatcher)(x)
    _assert_close(y, _run_layer(_single(), "all_reduce", names, 23, seed=6))
    _assert_close(y, no_pool)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_adapter_loaded_and_evicted_mid_run(layout):
    # Two slots, three adapters: the third batch evicts the least recently used adapter.
    batches = [["per_expert_r4", None, "shared_outer_r8"], ["shared_outer_r8", None],
               ["down_only_r6", "shared_outer_r8", None]]
    results = []
    for groups in (_groups(layout), _single()):
        pool = tiny.make_pool(CFG, groups.rank_layout, dtype=DTYPE, device=groups.device,
                              max_loras=2)
        layer = _layer(groups, pool, "auto")
        outs = []
        for i, names in enumerate(batches):
            x, seg = tiny.make_requests(CFG, 17, names, 10 + i, dtype=DTYPE, device=groups.device)
            outs.append(layer(x, tiny.batch_info_for(pool, names, ADAPTERS, seg)))
            pool.release_batch()
        results.append((outs, pool.slot_of("per_expert_r4")))
    (dist_outs, evicted), (ref_outs, _) = results
    assert evicted is None, "per_expert_r4 should have been evicted by down_only_r6"
    for y, ref in zip(dist_outs, ref_outs):
        _assert_close(y, ref)


def test_invalid_layout_fails_before_any_group():
    before = dict(groups_mod._CACHE)
    with pytest.raises(LayoutError, match="does not divide world_size"):
        init_parallel(WORLD + 1, 1)
    with pytest.raises(LayoutError, match="does not divide tp"):
        init_parallel(WORLD, WORLD + 1)
    assert groups_mod._CACHE == before


def _poison(t):
    t.view(-1)[0::2] = float("nan")
    t.view(-1)[1::2] = float("inf")


@pytest.mark.parametrize("layout,dispatcher", _cases(FAST))
def test_a_poisoned_slot_leaves_every_other_row_bit_identical(layout, dispatcher):
    """NaN/Inf planted (around every check) in one adapter's slot on every rank: the other
    adapters' and the base tokens' outputs do not change by one bit on any layout, and the
    poisoned adapter's own tokens really read the planted values."""
    g = _groups(layout)
    pool = tiny.make_pool(CFG, g.rank_layout, dtype=DTYPE, device=g.device)
    x, seg = tiny.make_requests(CFG, 31, MIXED, 12, dtype=DTYPE, device=g.device)
    info = tiny.batch_info_for(pool, MIXED, ADAPTERS, seg)
    layer = _layer(g, pool, dispatcher)
    good = layer(x, info)
    slot = pool.slot_of("shared_outer_r8")
    buf = pool.moe_buffers(0)
    for t in (buf.gate_up_a, buf.gate_up_b, buf.down_a, buf.down_b):
        _poison(t[slot])
    bad = layer(x, info)
    pool.release_batch()
    mine = info.token_slot_T == slot
    assert mine.any() and (~mine).any()
    assert torch.equal(bad[~mine], good[~mine])
    assert not torch.isfinite(bad[mine]).all()
