"""The whole engine (tiny random model, fp32 CPU) under a random load: 1,000 requests arriving
over time through a tiny page pool, three adapters over two slots, base requests mixed in.

Freed pages are filled with NaN the moment they return to the pool, so a sequence that read
any page it does not own (or a stale slot of a reused page) would produce non-finite
log-probabilities. Checked: every request ends with exactly its ``max_tokens`` tokens and
finite log-probabilities, the allocator's invariants hold after every step, the pool is empty
at the end, preemption really happened, and a sample of the requests equals the same request
run alone (tokens exactly; log-probabilities to 1e-4: batch company only reorders fp32 sums).
"""

import random

import pytest
import torch

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from tests.engine_cases import adapter, drive, tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_loras=2)


def _engine(model, num_pages, **kw):
    engine = Engine(model, EngineConfig(max_loras=2, max_rank=8, page_size=4,
                                        num_pages=num_pages, **kw))
    for i, rank in enumerate((4, 8, 6)):
        if model.pool.slot_of(f"a{i}") is not None:
            model.pool.release_batch()
            model.pool.unload(f"a{i}")
        engine.add_adapter(f"a{i}", adapter(f"a{i}", model.cfg, rank, seed=10 + i))
    return engine


def _poison_freed_pages(engine):
    real = engine.pages.free

    def free(seq_id):
        for p in engine.pages.table(seq_id):
            for t in engine.cache.k + engine.cache.v:
                t[p].fill_(float("nan"))
        return real(seq_id)

    engine.pages.free = free


def test_1000_random_requests_through_a_tiny_pool(model):
    rng = random.Random(0)
    n = 1000
    prompts = [[rng.randrange(128) for _ in range(rng.randint(1, 24))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, logprobs=0,
                             ignore_eos=True) for _ in range(n)]
    names = [rng.choice([None, "a0", "a1", "a2"]) for _ in range(n)]
    arrivals = sorted(rng.randint(0, 1500) for _ in range(n))
    engine = _engine(model, num_pages=16, max_num_batched_tokens=24, max_num_seqs=6)
    _poison_freed_pages(engine)
    done = drive(engine, prompts, names, params, arrivals, each_step=engine.pages.check)
    assert sorted(done) == list(range(n))
    for i, (ids, lps, reason) in done.items():
        assert len(ids) == params[i].max_tokens and reason == "length", i
        assert len(lps) == len(ids) and all(torch.isfinite(torch.tensor(lps))), i
    assert engine.pages.num_used == 0 and engine.scheduler.num_preemptions > 0
    m = engine.metrics()
    assert m.running == m.waiting == 0 and m.output_tokens == sum(p.max_tokens for p in params)
    solo = _engine(model, num_pages=64)
    for i in rng.sample(range(n), 25):
        ids, lps, _ = drive(solo, [prompts[i]], [names[i]], params[i])[0]
        assert ids == done[i][0], i
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(done[i][1]), atol=ATOL,
                                   rtol=0)
