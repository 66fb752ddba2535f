"""Continuous batching: which sequences run in the next forward, and how many tokens each.

One scheduler per data-parallel replica, on its leader rank; host Python only. Each step:

1. **Running sequences, oldest first.** Each gets what it still needs (1 token when decoding,
   the rest of its prompt when prefilling) up to the step's token budget
   (``max_num_batched_tokens``): a long prompt is prefilled in chunks over several steps, in
   the same forwards as the decodes (chunked prefill). When a sequence needs a page and none
   is free, the *youngest* running sequence is preempted (its pages freed, recomputed later)
   until the page is there; if the youngest is the sequence itself, it waits instead.
2. **Waiting sequences, in arrival order** (a preempted one keeps its arrival, so it is first
   again), while the budget, the sequence cap (``max_num_seqs``), the pages for the first
   chunk and the adapter cap allow. No new sequence is admitted in a step that preempted.

Adapters: the distinct adapters of all running sequences never exceed ``max_loras``, so every
step's adapters fit the pool's slots and none of them is evicted while it is in use.

Why nothing starves: admission is strictly first come first served (the head of the queue is
never overtaken), a request whose prompt and output could never fit the pool is refused at
``add_request``, and the oldest running sequence can always take pages from younger ones, so
it finishes; then the next oldest is the oldest.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.pages import PageAllocator
from moelora_dist.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    """One step: ``entries`` ``(sequence, new tokens)`` in forward order, the sequences
    preempted while scheduling it (their pages are already free)."""

    entries: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    @property
    def adapters(self) -> set[str]:
        return {s.adapter for s, _ in self.entries if s.adapter is not None}


class Scheduler:
    """Waiting and running queues over one :class:`PageAllocator` (module docstring)."""

    def __init__(self, config: EngineConfig, pages: PageAllocator):
        self.config, self.pages = config, pages
        self.waiting: list[Sequence] = []  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0

    def _key(self, seq: Sequence) -> int:
        return seq.arrival

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self._key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def running_adapters(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in self.running + self.waiting if s.request_id == request_id),
                    None)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of its queue and free its pages at once (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free(seq.request_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.free(seq.request_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self, ahead: bool = False) -> Scheduled | None:
        """Decide the next forward (module docstring); pages are taken here.

        ``ahead``: a step is in flight (``Engine.step`` plans the next one meanwhile): skip
        the sequences with nothing left to compute before its tokens come back (a prompt
        whose last chunk is in flight, an output at its length limit), and return None where
        a sequence could only run by preempting another (the engine then reads the step in
        flight first). Pages already taken and requests already admitted stay: the next
        decision schedules the same sequences again."""
        cfg, pages = self.config, self.pages
        out = Scheduled()
        budget = cfg.max_num_batched_tokens
        ending = 0  # running sequences the step in flight ends for sure
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted for an older one in this loop
                continue
            if ahead and (seq.num_computed == seq.num_tokens
                          or 0 < seq.max_new <= len(seq.output_ids)):
                ending += seq.max_new == 0 or seq.max_new <= len(seq.output_ids)
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            assert n >= 1, f"{seq.request_id} is running with nothing to compute"
            if ahead and not pages.can_grow(seq.request_id, seq.num_computed + n):
                return None
            while not pages.can_grow(seq.request_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            pages.grow(seq.request_id, seq.num_computed + n)
            out.entries.append((seq, n))
            budget -= n
        if out.preempted:
            return out
        adapters = self.running_adapters()
        while self.waiting and budget > 0 and len(self.running) - ending < cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter is not None and seq.adapter not in adapters \
                    and len(adapters) >= cfg.max_loras:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not pages.can_grow(seq.request_id, seq.num_computed + n):
                break
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=self._key)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            pages.grow(seq.request_id, seq.num_computed + n)
            out.entries.append((seq, n))
            budget -= n
        return out
