"""The scheduler and the page allocator, host only: admission under the token budget and the
sequence cap, chunked prefill sharing steps with decodes, preemption of the youngest and
resumption by recompute, the adapter cap, and 1,000 random requests through tiny page pools.

A fake forward stands in for the model: it advances each scheduled sequence by its tokens and,
when a step reaches a sequence's last known token, appends one output token (the engine's rule,
engine/step.py). Every step checks the allocator's invariants (no page held twice, none lost)
and that each scheduled sequence holds the pages its tokens need.
"""

import random

import pytest

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.engine.pages import PageAllocator
from moelora_dist.engine.scheduler import Scheduler
from moelora_dist.engine.sequence import Sequence, Status


def make(num_pages, page_size=4, **kw):
    cfg = EngineConfig(page_size=page_size, num_pages=num_pages, **kw)
    pages = PageAllocator(num_pages, page_size)
    return Scheduler(cfg, pages), pages


def seq(i, prompt_len, max_tokens, adapter=None):
    return Sequence(f"r{i}", i, list(range(1, prompt_len + 1)),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter, seed=i)


def step(sched, pages):
    """One scheduled step and the fake forward; returns the entries ``[(id, n)]``."""
    out = sched.schedule()
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert len(sched.running_adapters()) <= cfg.max_loras
    pages.check()
    for s, n in out.entries:
        assert s.status is Status.RUNNING
        assert len(pages.table(s.request_id)) * pages.page_size >= s.num_computed + n
    for s, n in out.entries:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(7)
            if len(s.output_ids) == s.params.max_tokens:
                s.status = Status.FINISHED
                sched.remove(s)
    return [(s.request_id, n) for s, n in out.entries], out.preempted


def test_admission_within_the_token_budget_and_sequence_cap():
    sched, pages = make(64, max_num_batched_tokens=10, max_num_seqs=3)
    for i in range(4):
        sched.add(seq(i, 4, 2))
    entries, _ = step(sched, pages)
    assert entries == [("r0", 4), ("r1", 4), ("r2", 2)]  # r2's prompt chunked; r3: cap of 3
    entries, _ = step(sched, pages)
    assert entries == [("r0", 1), ("r1", 1), ("r2", 2)]  # decodes, then the rest of r2
    entries, _ = step(sched, pages)
    assert entries == [("r2", 1), ("r3", 4)]  # r0, r1 finished at 2 tokens: r3 admitted


def test_chunked_prefill_shares_steps_with_decodes():
    sched, pages = make(64, max_num_batched_tokens=8)
    sched.add(seq(0, 3, 5))
    step(sched, pages)
    sched.add(seq(1, 25, 1))
    got = [step(sched, pages)[0] for _ in range(4)]
    assert got == [[("r0", 1), ("r1", 7)], [("r0", 1), ("r1", 7)], [("r0", 1), ("r1", 7)],
                   [("r0", 1), ("r1", 4)]]  # 25 prompt tokens in chunks beside r0's decode
    assert not sched.has_unfinished() or sched.running == [sched.running[0]]


def test_youngest_is_preempted_and_resumes_by_recompute():
    # 5 pages of 4 tokens: r0 (8 + 8 tokens) and r1 (6 + 8 tokens) cannot both finish
    sched, pages = make(5, max_num_batched_tokens=64)
    a, b = seq(0, 8, 8), seq(1, 6, 8)
    sched.add(a)
    sched.add(b)
    preempted_at = None
    for t in range(40):
        _, pre = step(sched, pages)
        if pre and preempted_at is None:
            preempted_at = t
            assert pre == [b] and b.status is Status.WAITING and b.num_computed == 0
            assert pages.table("r1") == [] and b.num_preemptions == 1
            out_before = list(b.output_ids)
        if not sched.has_unfinished():
            break
    assert preempted_at is not None
    assert len(a.output_ids) == 8 and len(b.output_ids) == 8
    assert b.output_ids[:len(out_before)] == out_before  # recomputed, then continued
    assert pages.num_free == 5


def test_adapter_cap_and_first_come_first_served():
    sched, pages = make(64, max_num_batched_tokens=64, max_loras=2)
    for i, name in enumerate(["a", "b", "c", None, "a"]):
        sched.add(seq(i, 2, 3 if i == 0 else 5, name))
    entries, _ = step(sched, pages)
    # r2 needs a third adapter: it waits, and nothing behind it overtakes it
    assert [e[0] for e in entries] == ["r0", "r1"]
    step(sched, pages)
    step(sched, pages)  # r0 ("a") finishes here
    entries, _ = step(sched, pages)
    # "a" left with r0: "c" gets its slot, the base request follows, and r4 ("a" again, a
    # third adapter now) waits for one of "b" / "c" to finish
    assert [e[0] for e in entries] == ["r1", "r2", "r3"]
    assert sched.running_adapters() == {"b", "c"} and sched.waiting[0].request_id == "r4"
    while sched.waiting:
        step(sched, pages)
    assert sched.running_adapters() <= {"a", "b", "c"} and len(sched.running_adapters()) <= 2


@pytest.mark.parametrize("num_pages", [12, 24], ids=["tiny_pool", "small_pool"])
def test_1000_random_requests(num_pages):
    """Arrivals at random steps, prompts up to 30 tokens, outputs up to 12, five adapters over
    two slots, 12 or 24 pages of 4 tokens: every request gets exactly its tokens, no page leaks,
    no two sequences ever hold a page together, admission is first come first served."""
    rng = random.Random(num_pages)
    sched, pages = make(num_pages, max_num_batched_tokens=16, max_num_seqs=6, max_loras=2)
    reqs = []
    for i in range(1000):
        p, m = rng.randint(1, 30), rng.randint(1, 12)
        while -(-(p + m) // 4) > num_pages:
            p, m = rng.randint(1, 30), rng.randint(1, 12)
        reqs.append((rng.randint(0, 1200), seq(i, p, m, rng.choice([None, "a", "b", "c",
                                                                     "d", "e"]))))
    reqs.sort(key=lambda r: r[0])
    admitted, t, nxt, preemptions = {}, 0, 0, 0
    while nxt < len(reqs) or sched.has_unfinished():
        while nxt < len(reqs) and reqs[nxt][0] <= t:
            reqs[nxt][1].arrival = nxt  # the engine's admission counter
            sched.add(reqs[nxt][1])
            nxt += 1
        entries, pre = step(sched, pages)
        preemptions += len(pre)
        for rid, _ in entries:
            admitted.setdefault(rid, t)
        t += 1
        assert t < 200_000, "no progress: a request starves"
    assert all(len(s.output_ids) == s.params.max_tokens for _, s in reqs)
    assert pages.num_free == num_pages and pages.num_used == 0
    pages.check()
    order = [admitted[s.request_id] for _, s in sorted(reqs, key=lambda r: r[1].arrival)]
    assert order == sorted(order)  # nobody overtook an earlier request
    assert preemptions > 0  # the pools really force preemption
