"""``async_steps``: the engine plans and queues step N+1 before it reads step N's tokens, whose
ids the plan takes from the device. Whatever the arrivals, stops, preemptions and aborts, the
requests' tokens, log-probabilities and finish reasons equal the engine that reads every step
back first, and every page comes back."""

import pytest
import torch

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.engine.sequence import Status
from tests.engine_cases import adapter, drive, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _engine(model, async_steps: bool, static: bool, **kw):
    cfg = EngineConfig(**{**dict(max_loras=2, max_rank=8, page_size=4, num_pages=48,
                                 max_graph_tokens=16 if static else 0, async_steps=async_steps),
                          **kw})
    e = Engine(model, cfg, capture=False if static else None)
    for name, (rank, seed) in {"a0": (4, 1), "a1": (8, 2)}.items():
        if model.pool.slot_of(name) is not None:
            model.pool.release_batch()
            model.pool.unload(name)
        e.add_adapter(name, adapter(name, model.cfg, rank, seed))
    return e


PROMPTS = [[2] * 3, list(range(5, 14)), [6, 7], list(range(20, 40)), [10], [12] * 4, [3, 1]]
NAMES = ["a1", "a0", None, None, "a1", "a0", None]
ARRIVALS = [0, 0, 1, 2, 2, 5, 9]
MAX_NEW = [6, 3, 8, 5, 1, 7, 4]


def _params(stops: dict[int, int]):
    out = []
    for i, n in enumerate(MAX_NEW):
        sampled = i % 2 == 1  # seeded sampling on half of them: the step index must match
        out.append(SamplingParams(max_tokens=n, temperature=0.8 if sampled else 0.0, seed=7 + i,
                                  logprobs=3, stop_token_ids=[stops[i]] if i in stops else [],
                                  ignore_eos=True))
    return out


def _run(engine, stops, checks=None):
    done = drive(engine, PROMPTS, NAMES, _params(stops), ARRIVALS, each_step=checks)
    assert engine.pages.num_used == 0 and not engine.has_unfinished()
    engine.pages.check()
    return done


@pytest.mark.parametrize("static,num_pages", [(True, 48), (False, 9), (True, 9)],
                         ids=["graph_steps", "eager_preempting", "graph_steps_preempting"])
def test_async_steps_equal_steps_read_back_one_by_one(model, static, num_pages):
    sync = _engine(model, False, static, num_pages=num_pages, max_num_batched_tokens=8)
    first = _run(sync, {})
    # Stop two requests on a token they make mid-way (the engine is then a step ahead of it).
    stops = {i: first[i][0][1] for i in (0, 2) if len(first[i][0]) > 2}
    want = _run(_engine(model, False, static, num_pages=num_pages, max_num_batched_tokens=8),
                stops)
    eng = _engine(model, True, static, num_pages=num_pages, max_num_batched_tokens=8)
    got = _run(eng, stops, checks=eng.pages.check)
    assert {i: stops[i] in want[i][0] for i in stops} == {i: True for i in stops}
    for i in range(len(PROMPTS)):
        assert got[i][0] == want[i][0], i
        assert got[i][2] == want[i][2], i
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(want[i][1]),
                                   atol=ATOL, rtol=0)
    assert eng.counters["ahead_steps"] > 0
    if num_pages == 9:
        assert sync.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_in_flight(model):
    """An aborted request's tokens in the step in flight are dropped: it gets no output after
    the abort, the other request is untouched and its pages all come back."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    solo = _engine(model, False, True)
    want = drive(solo, [[4, 5, 6]], ["a0"], params)[0][0]
    eng = _engine(model, True, True)
    eng.add_request("keep", [4, 5, 6], params, "a0")
    eng.add_request("drop", [7, 8], params, "a1")
    seen = {"keep": [], "drop": []}
    for _ in range(3):
        for out in eng.step():
            seen[out.request_id] += out.new_token_ids
    assert eng._in_flight is not None
    before = len(seen["drop"])
    assert eng.abort("drop")
    while eng.has_unfinished():
        for out in eng.step():
            seen[out.request_id] += out.new_token_ids
    assert seen["keep"] == want and len(seen["drop"]) == before
    assert eng.pages.num_used == 0
    eng.pages.check()


def test_schedule_ahead_skips_what_waits_for_the_step_in_flight(model):
    """Ahead of a step in flight the scheduler leaves out a sequence at its length limit (its
    last token is in flight) and returns None where it would have to preempt."""
    eng = _engine(model, True, True, num_pages=4)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    eng.add_request("one", [1, 2, 3], params, None)  # 1 page of 4 tokens, 1 new token
    sched = eng.scheduler.schedule()
    from moelora_dist.engine.step import complete_step, launch_step
    step = launch_step(eng, sched)
    seq = sched.entries[0][0]
    assert seq.num_pending == 1 and seq.status is Status.RUNNING
    ahead = eng.scheduler.schedule(ahead=True)
    assert ahead is not None and ahead.entries == []  # its only token is in flight
    complete_step(eng, step)
    assert seq.status is Status.FINISHED and seq.output_ids and seq.num_pending == 0
    # Two sequences that outgrow 4 pages: the sync schedule preempts, the ahead one refuses.
    long = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng.add_request("x", [1] * 4, long, None)
    eng.add_request("y", [2] * 4, long, None)
    step = launch_step(eng, eng.scheduler.schedule())  # 1 page each, both sample
    while True:
        ahead = eng.scheduler.schedule(ahead=True)
        if ahead is None:
            break
        nxt = launch_step(eng, ahead, step)
        complete_step(eng, step)
        step = nxt
    assert eng.scheduler.num_preemptions == 0
    complete_step(eng, step)


def test_stream_closed_early_leaves_no_step_in_flight(model):
    eng = _engine(model, True, True)
    gen = eng.stream([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=6, temperature=0.0,
                                                         ignore_eos=True))
    next(gen)
    next(gen)
    gen.close()
    assert not eng.has_unfinished() and eng.pages.num_used == 0
