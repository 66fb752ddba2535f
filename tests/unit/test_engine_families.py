"""DeepSeek-V3, GLM-4.5 and gpt-oss through the engine's padded static steps (the CUDA-graph
path of engine/graphs.py, run uncaptured on a CPU) against its eager steps, and through a page
pool small enough to preempt against a roomy one.

Models: tests/family_configs.py (random fp32 weights; MLA with YaRN, grouped sigmoid routing
with a correction bias, shared experts, dense first layer, sinks, windows of 4, biases, the
clamp) and two random adapters on every module the pool serves (router included). The static
engine pads each step to its bucket (padding tokens store no key, padding sequences have no
keys); prompts run past gpt-oss's window and over several pages. fp32 on CPU: the same ops
on the same values except the padding rows, so log-probabilities agree to 1e-4 and greedy
tokens exactly.
"""

import pytest
import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.random_weights import RandomWeights
from moelora_dist.parallel.groups import ParallelGroups
from tests.engine_cases import drive
from tests.family_configs import RAW, family_adapter

ATOL = 1e-4
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [9, 10], list(range(11, 24)), [30, 31, 32], [40] * 6]
NAMES = ["a", None, "b", "a", None]
ARRIVALS = [0, 0, 1, 3, 4]  # arrivals while others decode: mixed prefill + decode steps


@pytest.fixture(scope="module", params=list(RAW))
def model(request):
    cfg = ModelConfig.from_dict(RAW[request.param])
    return MoELoRAModel.build(cfg, ParallelGroups.single("cpu"), RandomWeights(
        cfg, torch.float32, "cpu", seed=0, std=0.2), dtype=torch.float32, max_loras=2,
        max_rank=8, progress=False)


def _engine(model, eager=True, **kw):
    cfg = EngineConfig(max_loras=2, max_rank=8, page_size=4, max_graph_tokens=16,
                       enforce_eager=eager, **{"num_pages": 48, **kw})
    engine = Engine(model, cfg, capture=None if eager else False)
    for name, rank, seed in (("a", 5, 1), ("b", 8, 2)):
        if model.pool.slot_of(name) is not None:  # the previous engine's, on this model
            model.pool.release_batch()
            model.pool.unload(name)
        engine.add_adapter(name, family_adapter(model.cfg, name, rank, seed))
    return engine


def _run(engine, names=NAMES, arrivals=ARRIVALS):
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    done = drive(engine, PROMPTS, names, params, arrivals)
    return [done[i] for i in range(len(PROMPTS))]


def test_static_steps_match_eager(model):
    static, eager = _engine(model, eager=False), _engine(model)
    got, want = _run(static), _run(eager)
    for (g_ids, g_lp, _), (w_ids, w_lp, _) in zip(got, want):
        assert g_ids == w_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=ATOL, rtol=0)
    assert static.counters["graph_steps"] > 0 and eager.counters["graph_steps"] == 0
    base = _run(_engine(model), names=[None] * len(PROMPTS))
    for w, b, n in zip(want, base, NAMES):  # every adapter request differs from base
        if n is not None:
            assert w[0] != b[0] or (torch.tensor(w[1]) - torch.tensor(b[1])).abs().max() \
                > 100 * ATOL


def test_preemption_through_a_small_pool_matches_a_roomy_one(model):
    """7 pages of 4 tokens for 5 sequences of up to 19 tokens: sequences are preempted and
    recomputed (MLA's padded values, windows and sinks included) and still give the roomy
    pool's tokens."""
    small = _engine(model, num_pages=7, max_num_batched_tokens=8)
    got = _run(small)
    assert small.scheduler.num_preemptions > 0
    for (g_ids, g_lp, _), (w_ids, w_lp, _) in zip(got, _run(_engine(model))):
        assert g_ids == w_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=ATOL, rtol=0)


def test_static_steps_run_the_router_lora_only_while_an_adapter_has_one(model, monkeypatch):
    """The static step's key carries whether any resident adapter has a router LoRA. With
    adapters that have none, no static step computes a router LoRA (in a CUDA graph that is
    two kernels per MoE layer saved); an adapter with one, loaded later into the same engine,
    switches its steps to the variant that runs it on every MoE layer, with the eager steps'
    tokens and log-probabilities."""
    from moelora_dist.adapters.canonical import CanonicalAdapter
    from moelora_dist.engine.graphs import GraphRunner
    from moelora_dist.models.lora_linear import DenseLoRA

    routers = set(model.router_paths())
    assert routers, "every family here has MoE layers"
    keys, calls, inside = [], [], []
    step, apply = GraphRunner._step, DenseLoRA.apply

    def spy_step(self, *key):
        keys.append(key)
        inside.append(True)
        try:
            return step(self, *key)
        finally:
            inside.pop()

    def spy_apply(self, y, x, path, out_rows=None):
        if inside and path in routers:
            calls.append(path)
        return apply(self, y, x, path, out_rows)

    monkeypatch.setattr(GraphRunner, "_step", spy_step)
    monkeypatch.setattr(DenseLoRA, "apply", spy_apply)

    def no_router(name, rank, seed):
        full = family_adapter(model.cfg, name, rank, seed)
        return CanonicalAdapter(name, moe=full.moe,
                                dense={p: f for p, f in full.dense.items() if p not in routers})

    def phases(eager):
        cfg = EngineConfig(max_loras=2, max_rank=8, page_size=4, max_graph_tokens=16,
                           enforce_eager=eager, num_pages=48)
        engine = Engine(model, cfg, capture=None if eager else False)
        for name in ("a", "b", "c"):
            if model.pool.slot_of(name) is not None:  # the previous engine's, on this model
                model.pool.release_batch()
                model.pool.unload(name)
        engine.add_adapter("a", no_router("a", 5, 1))
        engine.add_adapter("b", no_router("b", 8, 2))
        first = _run(engine)
        marks = len(keys), len(calls)
        engine.add_adapter("c", family_adapter(model.cfg, "c", 8, 3))
        second = _run(engine, names=["c", None, "a", "c", "b"])
        return first, second, marks

    eager_first, eager_second, _ = phases(eager=True)
    assert keys == [] and calls == []
    got_first, got_second, (n_keys, n_calls) = phases(eager=False)
    before = [k for k in keys[:n_keys] if k[1]]  # (P, lora, router, ...), LoRA steps only
    assert before and not any(k[2] for k in before)
    assert n_calls == 0, "a static step ran a router LoRA while no adapter had one"
    after = [k for k in keys[n_keys:] if k[1]]
    assert after and all(k[2] for k in after)
    assert len(calls) == len(after) * len(routers)  # every MoE layer, in every such step
    for got, want in ((got_first, eager_first), (got_second, eager_second)):
        for (g_ids, g_lp, _), (w_ids, w_lp, _) in zip(got, want):
            assert g_ids == w_ids
            torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=ATOL,
                                       rtol=0)
