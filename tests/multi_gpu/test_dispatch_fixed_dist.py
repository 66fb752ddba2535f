"""The fixed-capacity all-to-all dispatcher on every layout of this world size.

Run under torchrun (see conftest.py). Two kinds of check:

- *Probe experts*: instead of the MoE experts, each rank computes from what it received
  ``y = sum_k w_k * (x * (global id_k + 1) + slot + 2)`` over its valid pairs, with the global id
  rebuilt from the local one. After combine every token must get exactly that sum over its K
  experts (times ``moe_tp``: every MoE-TP rank adds one), so a wrong row, weight, local id,
  slot, a lost or doubled copy, or a dropped overflow row changes the result. The references
  (``ref_all_to_all``, ``all_to_all``, ``all_to_all_static``) run through the same probe.
- *The layer*: ``LoRAMoE`` with mixed adapters against the single-process layer, with the
  capacity forced below the need (overflow), and with poisoned LoRA buffers.

Tolerances: fp64 on CPU; the sums differ only in order (1e-12 of the scale). Every collective
of a test runs before its first assert (a failing rank must not leave the others waiting).
"""

import logging
import os

import pytest
import torch
import torch.distributed as dist

from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.dispatch import make_dispatcher
from moelora_dist.moe.dispatch.all_to_all_fixed import AllToAllFixedDispatcher, FixedConfig
from moelora_dist.moe.dispatch.capacity import CapacityRule
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel.groups import ParallelGroups, init_parallel
from moelora_dist.parallel.layout import valid_layouts
from moelora_dist.testing import tiny

WORLD = int(os.environ.get("WORLD_SIZE", "0"))
CUDA = os.environ.get("MOELORA_DIST_BACKEND") == "nccl"
DTYPE = torch.bfloat16 if CUDA else torch.float64
REL_TOL = 5e-2 if CUDA else 1e-12
E, I, K, H = 8, 16, 3, 6
LAYOUTS = valid_layouts(WORLD, E, I) if WORLD else []
VARIANTS = {  # name -> config of the fixed dispatcher
    "default": FixedConfig(),
    "no-bypass": FixedConfig(bypass_self=False),
    "cap1-overflow": FixedConfig(capacity=CapacityRule(rows=1)),
    "cap2-overflow-no-bypass": FixedConfig(capacity=CapacityRule(rows=2), bypass_self=False),
    "cap2-overflow-triton": FixedConfig(capacity=CapacityRule(rows=2), backend="triton"),
}
REFERENCES = ("ref_all_to_all", "all_to_all", "all_to_all_static")


def _id(layout):
    return f"tp{layout.tp}-ep{layout.ep}"


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def _inputs(T: int, seed: int, *, slots: bool = True, only_rank: int | None = None, P: int = 1):
    """Tokens, top-k weights, global ids with -1 sentinels (a whole row of them too), slots
    with -1. ``only_rank``: every id on that EP rank's experts (skewed routing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.rand(T, K, generator=g, dtype=torch.float32)
    ids = torch.randint(-1, E, (T, K), generator=g, dtype=torch.int32)
    if only_rank is not None:
        el = E // P
        ids = torch.randint(only_rank * el, (only_rank + 1) * el, (T, K), generator=g,
                            dtype=torch.int32)
    if T > 2:
        ids[T // 2] = -1
    slot = torch.randint(-1, 4, (T,), generator=g, dtype=torch.int32) if slots else None
    dev = _device()
    return (x.to(dev, DTYPE), w.to(dev), ids.to(dev), None if slot is None else slot.to(dev))


def _probe(dispatcher, routed) -> torch.Tensor:
    ids = routed.topk_ids_NK.long()
    keep = ids >= 0
    gid = torch.where(keep, ids + dispatcher.shard.expert_start, 0).double()
    w = torch.where(keep, routed.topk_weights_NK.double(), 0.0)
    slot = 0.0 if routed.token_slot_N is None else routed.token_slot_N.double()[:, None, None]
    x = routed.x_NH.double()[:, None, :]
    return (w[:, :, None] * (x * (gid[:, :, None] + 1) + slot + 2)).sum(1).to(routed.x_NH.dtype)


def _expected(x, w, ids, slot, moe_tp: int) -> torch.Tensor:
    keep = ids >= 0
    gid = torch.where(keep, ids.long(), 0).double()
    ww = torch.where(keep, w.double(), 0.0)
    s = 0.0 if slot is None else slot.double()[:, None, None]
    return moe_tp * (ww[:, :, None] * (x.double()[:, None, :] * (gid[:, :, None] + 1) + s + 2)
                     ).sum(1)


def _round_trip(dispatcher, x, w, ids, slot):
    routed = dispatcher.dispatch(x, w, ids, slot)
    return dispatcher.combine(_probe(dispatcher, routed), routed)


def _close(y, want) -> str | None:
    if y.shape != want.shape:
        return f"shape {tuple(y.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return None
    scale = want.abs().max().item() + 1e-12
    err = (y.double() - want.double()).abs().max().item()
    return None if err <= REL_TOL * scale else f"max abs err {err:.3e} vs scale {scale:.3e}"


def _all_ok(problems: dict) -> None:
    """Assert after every collective: the worst rank's problems fail every rank."""
    bad = torch.tensor([len(problems)], dtype=torch.int64, device=_device())
    dist.all_reduce(bad, group=dist.group.WORLD)
    assert not problems, problems
    assert int(bad) == 0, "another rank failed (see its report)"


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "no-slots"])
@pytest.mark.parametrize("num_tokens", [0, 1, 3, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_probe_round_trip_matches_the_references(layout, num_tokens, slots):
    # T = 1 and 3 leave EP ranks with empty shares (T < P) at EP 4 and 8.
    g = init_parallel(layout.tp, layout.ep)
    shard = g.rank_layout.moe_shard(E, I)
    x, w, ids, slot = _inputs(num_tokens, 11 + num_tokens, slots=slots)
    want = _expected(x, w, ids, slot, layout.moe_tp)
    outs = {name: _round_trip(AllToAllFixedDispatcher(g, shard, cfg), x, w, ids, slot)
            for name, cfg in VARIANTS.items()}
    refs = {name: _round_trip(make_dispatcher(name, g, shard), x, w, ids, slot)
            for name in REFERENCES}
    problems = {name: p for name, y in {**outs, **refs}.items() if (p := _close(y, want))}
    problems.update({f"{name} vs ref_all_to_all": p for name, y in outs.items()
                     if (p := _close(y, refs["ref_all_to_all"]))})
    _all_ok(problems)


@pytest.mark.parametrize("rows", [None, 1, 5], ids=["rule", "cap1", "cap5"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_skewed_routing_to_one_rank_is_exact_and_counted(layout, rows):
    # Every token's experts live on the last EP rank: it needs the whole share of every source;
    # the other destinations get padding rows only.
    g = init_parallel(layout.tp, layout.ep)
    P, me, shard = g.ep_size, g.rank_layout.moe_ep_rank, g.rank_layout.moe_shard(E, I)
    T = 29
    x, w, ids, slot = _inputs(T, 5, only_rank=P - 1, P=P)
    ids[T // 2] = -1  # the -1 row needs nobody
    d = AllToAllFixedDispatcher(g, shard, FixedConfig(capacity=CapacityRule(rows=rows)))
    y = _round_trip(d, x, w, ids, slot)
    C0 = -(-T // P)
    cap = C0 if rows is None or P == 1 else min(rows, C0)
    start, end = min(T, me * C0), min(T, me * C0 + C0)
    mine = int((ids[start:end] >= 0).any(dim=1).sum())  # all of them go to rank P - 1
    sent = torch.tensor([d.stats.overflow_rows, max(0, mine - cap)], device=_device())
    need = torch.tensor([max(0, int((ids[min(T, s * C0):min(T, s * C0 + C0)] >= 0).any(1).sum())
                             - cap) for s in range(P)], device=_device())
    dist.all_reduce(sent, group=g.ep_group)
    problems = {}
    if p := _close(y, _expected(x, w, ids, slot, layout.moe_tp)):
        problems["result"] = p
    overflowed = bool(need.sum() > 0)
    if d.stats.overflow_calls != int(overflowed) or d.stats.calls != 1:
        problems["stats"] = f"{d.stats} but some share overflowed: {overflowed}"
    if d.stats.checked_calls != int(cap < C0):
        problems["checked"] = f"{d.stats} with capacity {cap} of share {C0}"
    if int(sent[0]) != int(need.sum()) or int(sent[0]) != int(sent[1]):
        problems["overflow rows"] = f"sent {sent.tolist()} need {need.tolist()}"
    _all_ok(problems)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_exactly_at_capacity_fills_the_blocks_without_overflow(layout, caplog):
    g = init_parallel(layout.tp, layout.ep)
    P, shard = g.ep_size, g.rank_layout.moe_shard(E, I)
    T = 37
    x, w, ids, slot = _inputs(T, 8)
    C0, el = -(-T // P), E // P
    counts = [int(((ids[min(T, s * C0):min(T, s * C0 + C0)] >= d * el) &
                   (ids[min(T, s * C0):min(T, s * C0 + C0)] < d * el + el)).any(1).sum())
              for s in range(P) for d in range(P)]
    d_exact = AllToAllFixedDispatcher(g, shard, FixedConfig(capacity=CapacityRule(rows=max(counts))))
    short = max(max(counts) - 1, 1)
    d_short = AllToAllFixedDispatcher(g, shard, FixedConfig(capacity=CapacityRule(rows=short)))
    with caplog.at_level(logging.WARNING, logger="moelora_dist.moe.dispatch.all_to_all_fixed"):
        y_exact = _round_trip(d_exact, x, w, ids, slot)
        y_short = _round_trip(d_short, x, w, ids, slot)
    want = _expected(x, w, ids, slot, layout.moe_tp)
    problems = {k: p for k, y in (("exact", y_exact), ("short", y_short)) if (p := _close(y, want))}
    if d_exact.stats.overflow_calls != 0:
        problems["exact stats"] = str(d_exact.stats)
    short_overflows = P > 1 and max(counts) > short
    if d_short.stats.overflow_calls != int(short_overflows):
        problems["short stats"] = str(d_short.stats)
    sent_here = d_short.stats.overflow_rows > 0
    logged = any("overflowed" in r.getMessage() for r in caplog.records)
    if logged != sent_here:
        problems["log"] = f"logged {logged}, sent overflow rows {d_short.stats.overflow_rows}"
    _all_ok(problems)


CFG = tiny.TinyMoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, num_layers=1)
ADAPTERS = {a.name: a for a in tiny.make_adapters(CFG)}
MIXED = ["per_expert_r4", None, "shared_outer_r8", "gate_up_shared_a_r2", None, "down_only_r6",
         "per_expert_r4"]


def _layer(groups, pool, dispatcher):
    router, gu, down = tiny.full_weights(CFG, 0)
    shard = groups.rank_layout.moe_shard(CFG.num_experts, CFG.intermediate)
    dev = groups.device
    base = MoEBlock.from_full(router.to(dev, DTYPE), gu.to(dev, DTYPE), down.to(dev, DTYPE),
                              top_k=CFG.top_k, renormalize=CFG.renormalize, shard=shard)
    if callable(dispatcher):
        dispatcher = dispatcher(groups, shard)
    return LoRAMoE(base, pool, 0, groups, dispatcher)


def _poison_unrequested_pairs(layer, pool, x, info) -> int:
    """NaN into every per-expert LoRA factor of (slot, local expert) pairs that no token of the
    batch asks for on this rank; returns how many pairs were poisoned."""
    _, ids = layer.base.route(x)
    slots = info.token_slot_T
    wanted = {(int(s), int(e)) for s, row in zip(slots.tolist(), ids.tolist()) for e in row}
    lora, shard = pool.moe_buffers(0), layer.base.shard
    poisoned = 0
    for s in range(lora.num_slots):
        for el in range(shard.num_local_experts):
            if (s, shard.expert_start + el) in wanted:
                continue
            poisoned += 1
            lora.gate_up_b[s, el].fill_(float("nan"))
            lora.down_a[s, el].fill_(float("nan"))
            if not bool(lora.gate_up_a_shared[s]) and lora.gate_up_a.shape[1] > 1:
                lora.gate_up_a[s, el].fill_(float("nan"))
            if not bool(lora.down_b_shared[s]) and lora.down_b.shape[1] > 1:
                lora.down_b[s, el].fill_(float("nan"))
    return poisoned


def _run(groups, dispatcher, names, T, seed, poison=False):
    pool = tiny.make_pool(CFG, groups.rank_layout, dtype=DTYPE, device=groups.device)
    x, seg = tiny.make_requests(CFG, T, names, seed, dtype=DTYPE, device=groups.device)
    info = tiny.batch_info_for(pool, names, ADAPTERS, seg)
    layer = _layer(groups, pool, dispatcher)
    poisoned = _poison_unrequested_pairs(layer, pool, x, info) if poison else 0
    y = layer(x, info)
    pool.release_batch()
    return y, layer, poisoned


OVERFLOW = {
    "cap2": lambda g, s: AllToAllFixedDispatcher(g, s, FixedConfig(capacity=CapacityRule(rows=2))),
    "cap2-triton": lambda g, s: AllToAllFixedDispatcher(
        g, s, FixedConfig(capacity=CapacityRule(rows=2), backend="triton")),
    "rule": "all_to_all_fixed",
}


@pytest.mark.parametrize("variant", OVERFLOW)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_mixed_adapters_survive_overflow_and_never_read_unsent_lora(layout, variant):
    g = init_parallel(layout.tp, layout.ep)
    y, layer, poisoned = _run(g, OVERFLOW[variant], MIXED, 41, seed=3, poison=True)
    ref, _, _ = _run(ParallelGroups.single(_device()), "all_reduce", MIXED, 41, seed=3)
    stats = layer.get_dispatcher(41).stats
    total = torch.tensor([poisoned], device=_device())
    dist.all_reduce(total, group=dist.group.WORLD)  # at EP 8 a rank may need every pair
    problems = {}
    if p := _close(y, ref):
        problems["output"] = p
    if int(total) == 0:
        problems["poison"] = "nothing poisoned on any rank: the check would be vacuous"
    if variant != "rule" and g.ep_size > 1 and stats.overflow_calls != 1:
        problems["overflow"] = f"capacity 2 of a share of {-(-41 // g.ep_size)}: {stats}"
    _all_ok(problems)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_poisoned_lora_of_a_requested_pair_shows(layout):
    # The poison check above can fail: NaN in one pair that tokens do ask for reaches the output.
    g = init_parallel(layout.tp, layout.ep)
    pool = tiny.make_pool(CFG, g.rank_layout, dtype=DTYPE, device=g.device)
    x, seg = tiny.make_requests(CFG, 41, MIXED, 3, dtype=DTYPE, device=g.device)
    info = tiny.batch_info_for(pool, MIXED, ADAPTERS, seg)
    layer = _layer(g, pool, "all_to_all_fixed")
    t = int((info.token_slot_T >= 0).nonzero()[0])  # the first token with an adapter
    slot = int(info.token_slot_T[t])
    _, ids = layer.base.route(x)
    expert, shard = int(ids[t, 0]), layer.base.shard
    if shard.owns_expert(expert):  # the reference reads all four factors of a (slot, expert)
        lora = pool.moe_buffers(0)
        lora.gate_up_b[slot, expert - shard.expert_start].fill_(float("nan"))
        lora.down_a[slot, expert - shard.expert_start].fill_(float("nan"))
    y = layer(x, info)
    pool.release_batch()
    _all_ok({} if bool(torch.isnan(y[t]).all()) else {"nan": "the poisoned pair was not seen"})


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need NCCL on GPUs; gloo CPU ranks have none")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_graph_capture_sends_the_share_and_replays_exactly(layout):
    # A capacity of 1 row overflows eagerly (second exchange); under capture the dispatcher
    # must use the whole share instead, so the replay is exact with no host read.
    g = init_parallel(layout.tp, layout.ep)
    shard = g.rank_layout.moe_shard(E, I)
    d = AllToAllFixedDispatcher(g, shard, FixedConfig(capacity=CapacityRule(rows=1)))
    x, w, ids, slot = _inputs(37, 9)
    eager = _round_trip(d, x, w, ids, slot)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _round_trip(d, x, w, ids, slot)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = _round_trip(d, x, w, ids, slot)
    captured_capacity = d.stats.last_capacity
    graph.replay()
    torch.cuda.synchronize()
    problems = {k: p for k, y in (("eager", eager), ("graph", y_graph))
                if (p := _close(y, _expected(x, w, ids, slot, layout.moe_tp)))}
    if captured_capacity != -(-37 // g.ep_size):
        problems["capacity"] = f"captured with {captured_capacity} rows"
    _all_ok(problems)
