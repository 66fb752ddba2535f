"""The leader's step: scheduler decision -> plan (broadcast) -> forward -> tokens -> outputs.

Legend: T tokens, B sequences of the step, N sequences that sample, V vocab.

A sequence samples when the step reaches its last known token (the end of its prompt, or its
last generated token); a prefill chunk that stops short of it only fills pages. Prompt logits
(the ``logits`` job) and prompt log-probabilities are taken from the eager forward of the
chunks that compute those positions, each position once even if the prompt is recomputed
after a preemption.

A step is two halves. :func:`launch_step` queues the forward and a copy of its sampled ids
(and log-probabilities) to pinned host memory, does the bookkeeping that does not need the
tokens (``num_computed``; a placeholder output token per sampling sequence, counted by
``Sequence.num_pending``) and returns a :class:`Launched`; :func:`complete_step` waits for
that copy only, puts the tokens in place of the placeholders, applies the stop rules and
returns the outputs. Between the two the engine may launch the next step (``Engine.step``,
``EngineConfig.async_steps``): its plan takes the pending tokens from the device (``ahead``:
the launched step whose sampled ids they are), so the host schedules and plans step N+1
while the device runs step N. Every device write is ordered on one stream, so step N+1 reads
what step N wrote; a sequence that step N ends (EOS, a stop) rides in step N+1 for nothing
and its token there is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelora_dist.engine.sampling import SamplingBatch, SamplingParams
from moelora_dist.engine.graphs import sampling_variant
from moelora_dist.engine.outputs import RequestOutput, TokenLogprob
from moelora_dist.engine.plan import build_plan, host_to_device, send_plan
from moelora_dist.engine.sequence import Status

MAX_GRAPH_LOGPROBS = 20  # graphs with log-probabilities compute this many (OpenAI's maximum)
_PAD = SamplingParams(max_tokens=1, temperature=0.0)
PENDING = 0  # the host's placeholder of a token still on the device (never fed: patched)


@dataclass
class Launched:
    """A step whose forward is queued: its entries, what it samples and where the tokens
    land on the host (``host``: pinned copies of the sampled tensors, valid once ``ready``
    has fired; on a CPU the copies are done at once and ``ready`` is None)."""

    entries: list
    want: list
    sample_seqs: list[int]
    num_logprobs: int
    want_lp: bool
    sampled: object = None  # the device SampleOutput (its rows: sample_seqs order)
    host: list = field(default_factory=list)
    ready: object = None
    logits: list = field(default_factory=list)
    prompt_tokens: int = 0

    def row_of(self) -> dict:
        """Sequence -> its row of ``sampled``."""
        seqs = [s for s, _ in self.entries]
        return {seqs[b]: i for i, b in enumerate(self.sample_seqs)}


def _prompt_positions(seq, start: int, n: int) -> tuple[int, int]:
    """Prompt positions ``[lo, hi)`` of this chunk whose logits are still wanted."""
    limits = []
    if seq.want_prompt_logits:
        limits.append((seq.num_prompt_logits, seq.num_prompt))
    if seq.params.prompt_logprobs is not None:
        limits.append((len(seq.prompt_logprobs), seq.num_prompt - 1))
    if not limits:
        return 0, 0
    lo = max(start, min(done for done, _ in limits))
    hi = min(start + n, max(end for _, end in limits))
    return lo, max(lo, hi)


def _top(logp_V: torch.Tensor, token: int, n: int) -> TokenLogprob:
    top = torch.topk(logp_V, n) if n else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if n else []
    return TokenLogprob(token, float(logp_V[token]), pairs)


def _patch_pending(plan, seqs, counts, seg, ahead: Launched | None) -> None:
    """Write into the plan's token ids, on the device, the tokens that ``ahead`` (the step
    still in flight) samples for the sequences whose last token is still pending."""
    if ahead is None or ahead.sampled is None:
        return
    rows = ahead.row_of()
    at, src = [], []
    for b, (s, n) in enumerate(zip(seqs, counts)):
        if s.num_pending and s.num_computed + n == s.num_tokens and s in rows:
            at.append(seg[b + 1] - 1)
            src.append(rows[s])
    if not at:
        return
    dev = plan.payload.device
    idx = host_to_device(at + src, dev).view(2, -1)
    ids = plan.input_ids_T
    ids.index_copy_(0, idx[0], ahead.sampled.token_ids_B.index_select(0, idx[1]).to(ids.dtype))


def _copy_to_host(tensors: list[torch.Tensor]) -> tuple[list, object]:
    """Queue device -> host copies of ``tensors`` (pinned, no wait) and an event after them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def launch_step(engine, scheduled, ahead: Launched | None = None) -> Launched:
    """Queue the forward of the scheduler's decision ``scheduled`` (module docstring);
    ``ahead``: the launched step not read back yet, whose tokens this one feeds on."""
    cfg, pages, worker = engine.config, engine.pages, engine.worker
    entries = scheduled.entries
    seqs = [s for s, _ in entries]
    counts = [n for _, n in entries]
    slots = engine.adapters.prepare(engine.scheduler.running_adapters())
    lora = [slots[s.adapter] if s.adapter is not None else -1 for s in seqs]
    seg = [0]
    for n in counts:
        seg.append(seg[-1] + n)
    sample_seqs = [b for b, (s, n) in enumerate(entries)
                   if s.num_computed + n == s.num_tokens and s.max_new > 0]
    num_logprobs = max([seqs[b].params.logprobs or 0 for b in sample_seqs] + [0])
    want = [_prompt_positions(s, s.num_computed, n) for s, n in entries]
    ranges = [(seg[b] + lo - s.num_computed, seg[b] + hi - s.num_computed)
              for b, (s, (lo, hi)) in enumerate(zip(seqs, want)) if hi > lo]
    P = 0 if ranges else worker.graph_bucket(seg[-1])
    Q = worker.graphs.seqs_for(P) if P else 0
    if P:  # every row of the graph samples; rows that do not sample this step are greedy
        params = [_PAD] * Q
        seeds, steps = [0] * Q, [0] * Q
        for b in sample_seqs:
            params[b], seeds[b], steps[b] = seqs[b].params, seqs[b].seed, len(seqs[b].output_ids)
    else:
        params = [seqs[b].params for b in sample_seqs]
        seeds = [seqs[b].seed for b in sample_seqs]
        steps = [len(seqs[b].output_ids) for b in sample_seqs]
    sampling = SamplingBatch.from_params(params, seeds, steps, engine.model.device) \
        if params else None
    graph_lp = (MAX_GRAPH_LOGPROBS if num_logprobs else 0) if P else 0
    ops, outgoing = engine.adapters.take_ops()
    plan = build_plan(seqs, counts, [pages.table(s.request_id) for s in seqs], lora,
                      cfg.page_size, engine.model.device, P, graph_lp,
                      sampling_variant(sampling) if P else 0, ops if engine.followers else [],
                      graph_seqs=Q or None)
    _patch_pending(plan, seqs, counts, seg, ahead)
    if engine.followers:
        g = engine.groups
        send_plan(plan, g.tp_group, engine.src, g.device)
        engine.send_adapter_tensors(ops, outgoing)
    res = worker.execute(plan, sampling, sample_seqs, [seg[b + 1] - 1 for b in sample_seqs],
                         graph_lp or num_logprobs, ranges)
    engine.counters["steps"] += 1
    engine.counters["graph_steps"] += int(P > 0)
    engine.counters["decode_steps"] += int(plan.decode_only)
    want_lp = any(seqs[b].params.logprobs is not None for b in sample_seqs)
    step = Launched(entries, want, sample_seqs, num_logprobs, want_lp, logits=res.logits)
    if sample_seqs:
        out = step.sampled = res.sampled
        wanted = [out.token_ids_B]
        if want_lp:
            wanted += [out.logprob_B, out.top_ids_BN[:, :num_logprobs],
                       out.top_logprobs_BN[:, :num_logprobs]]
        step.host, step.ready = _copy_to_host(wanted)
    for s, n in entries:
        step.prompt_tokens += max(0, min(s.num_computed + n, s.num_prompt) - s.num_computed)
        s.num_computed += n
    for b in sample_seqs:
        seqs[b].output_ids.append(PENDING)
        seqs[b].num_pending += 1
    if engine.after_launch is not None:  # the forward is queued: the host is free until the sync
        engine.after_launch()
    return step


def complete_step(engine, step: Launched) -> list[RequestOutput]:
    """Wait for ``step``'s tokens, put them in place and return the outputs of the sequences
    it served that were still running (module docstring)."""
    seqs = [s for s, _ in step.entries]
    live = [s.status is Status.RUNNING for s in seqs]
    engine.counters["prompt_tokens"] += step.prompt_tokens  # counted when read back
    sampled = _read(step) if step.sample_seqs else []
    logits = iter(step.logits)
    for s, ok, (lo, hi) in zip(seqs, live, step.want):
        if hi > lo:
            chunk = next(logits)
            if ok:
                _take_prompt_logits(s, lo, hi, chunk)
    for b, (token, lp) in zip(step.sample_seqs, sampled):
        if seqs[b].status is Status.RUNNING:
            _accept(engine, seqs[b], token, lp)
    outputs = []
    for s, ok in zip(seqs, live):
        if not ok:
            continue
        if s.status is Status.RUNNING and s.max_new == 0 and s.num_computed == s.num_tokens:
            finish(engine, s, "length")
        out = output_of(s)
        if out is not None:
            outputs.append(out)
    return outputs


def _read(step: Launched) -> list[tuple[int, tuple | None]]:
    """The step's one wait: its sampled ids, and their log-probabilities when asked."""
    if step.ready is not None:
        step.ready.synchronize()
    ids = step.host[0].tolist()
    if not step.want_lp:
        return [(t, None) for t in ids]
    lp, top_ids, top_lp = (t.tolist() for t in step.host[1:])
    return [(t, (lp[i], top_ids[i], top_lp[i])) for i, t in enumerate(ids)]


def _take_prompt_logits(seq, lo: int, hi: int, logits_nV: torch.Tensor) -> None:
    """Keep the logits of prompt positions ``[lo, hi)`` and/or their log-probabilities."""
    if seq.want_prompt_logits and lo == seq.num_prompt_logits:
        seq.prompt_logits.append(logits_nV[: seq.num_prompt - lo])
    n = seq.params.prompt_logprobs
    if n is not None:
        first = len(seq.prompt_logprobs)
        logp = torch.log_softmax(logits_nV.float(), dim=-1)
        for p in range(max(lo, first), min(hi, seq.num_prompt - 1)):
            seq.prompt_logprobs.append(_top(logp[p - lo], seq.prompt_ids[p + 1], n))


def _accept(engine, seq, token: int, lp) -> None:
    """The oldest pending token of ``seq`` is ``token``: put it in place, with its
    log-probabilities and text; check the stop rules (EOS, then stop token ids, then stop
    strings in the text, then the length)."""
    params = seq.params
    index = len(seq.output_ids) - seq.num_pending
    seq.output_ids[index] = token
    seq.num_pending -= 1
    engine.counters["output_tokens"] += 1
    if params.logprobs is not None and lp is not None:
        k = params.logprobs
        seq.logprobs.append(TokenLogprob(token, lp[0], list(zip(lp[1][:k], lp[2][:k]))))
    stopped = False
    if seq.detokenizer is not None:
        delta = seq.detokenizer.push([token])
        if seq.stop_matcher is not None:
            delta, stopped = seq.stop_matcher.feed(delta)
        seq.text += delta
    if token in engine.eos_ids and not params.ignore_eos:
        finish(engine, seq, "eos")
    elif token in params.stop_token_ids or stopped:
        finish(engine, seq, "stop")
    elif index + 1 >= seq.max_new:
        finish(engine, seq, "length")


def drop_pending(seq) -> None:
    """Forget the placeholders of tokens still in flight (the sequence ends before them)."""
    if seq.num_pending:
        del seq.output_ids[len(seq.output_ids) - seq.num_pending:]
        seq.num_pending = 0


def finish(engine, seq, reason: str) -> None:
    """End ``seq`` now: its pages go back to the pool at once; the text held back by the
    detokenizer (and by a stop matcher that did not match) is released."""
    seq.status, seq.finish_reason = Status.FINISHED, reason
    drop_pending(seq)
    engine.scheduler.remove(seq)
    if seq.detokenizer is not None and not (seq.stop_matcher and seq.stop_matcher.stopped):
        tail = seq.detokenizer.flush()
        if seq.stop_matcher is not None:
            tail, stopped = seq.stop_matcher.feed(tail)
            tail += "" if stopped else seq.stop_matcher.flush()
            if stopped:
                seq.finish_reason = "stop"
        seq.text += tail
    if seq.adapter is not None:
        engine.finished_by_adapter[seq.adapter] = engine.finished_by_adapter.get(
            seq.adapter, 0) + 1


def output_of(seq) -> RequestOutput | None:
    """The delta of ``seq`` since its last output, or None when nothing changed."""
    known = len(seq.output_ids) - seq.num_pending
    new = seq.output_ids[seq.num_emitted:known]
    finished = seq.status is Status.FINISHED
    if not new and not finished:
        return None
    out = RequestOutput(seq.request_id, new, finished=finished,
                        finish_reason=seq.finish_reason if finished else None,
                        num_prompt_tokens=seq.num_prompt, num_output_tokens=known)
    if seq.detokenizer is not None:
        out.text_delta = seq.text[seq.num_text_emitted:]
        seq.num_text_emitted = len(seq.text)
    if seq.params.logprobs is not None:
        out.logprobs = seq.logprobs[seq.num_logprobs_emitted:]
        seq.num_logprobs_emitted = len(seq.logprobs)
    if seq.params.prompt_logprobs is not None and seq.num_emitted == 0:
        out.prompt_logprobs = [None] + seq.prompt_logprobs
    seq.num_emitted = known
    if seq.num_emitted == 0 and not finished:
        return None
    return out
