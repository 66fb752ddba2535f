"""The leader's step: scheduler decision -> plan (broadcast) -> forward -> tokens -> outputs.

Legend: T tokens, B sequences of the step, N sequences that sample, V vocab.

A sequence samples when the step reaches its last known token (the end of its prompt, or its
last generated token); a prefill chunk that stops short of it only fills pages. Prompt logits
(the ``logits`` job) and prompt log-probabilities are taken from the eager forward of the
chunks that compute those positions, each position once even if the prompt is recomputed
after a preemption. One host sync per step reads the sampled ids (and their log-probabilities).
"""

from __future__ import annotations

import torch

from moelora_dist.engine.sampling import SamplingBatch, SamplingParams
from moelora_dist.engine.graphs import sampling_variant
from moelora_dist.engine.outputs import RequestOutput, TokenLogprob
from moelora_dist.engine.plan import build_plan, send_plan
from moelora_dist.engine.sequence import Status

MAX_GRAPH_LOGPROBS = 20  # graphs with log-probabilities compute this many (OpenAI's maximum)
_PAD = SamplingParams(max_tokens=1, temperature=0.0)


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


def run_step(engine, scheduled) -> list[RequestOutput]:
    """Execute the scheduler's decision ``scheduled`` and return the outputs (module doc)."""
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
    if engine.followers:
        g = engine.groups
        send_plan(plan, g.tp_group, engine.src, g.device)
        engine.send_adapter_tensors(ops, outgoing)
    res = worker.execute(plan, sampling, sample_seqs, [seg[b + 1] - 1 for b in sample_seqs],
                         graph_lp or num_logprobs, ranges)
    engine.counters["steps"] += 1
    engine.counters["graph_steps"] += int(P > 0)
    engine.counters["decode_steps"] += int(plan.decode_only)
    if engine.after_launch is not None:  # the forward is queued: the host is free until the sync
        engine.after_launch()
    want_lp = any(seqs[b].params.logprobs is not None for b in sample_seqs)
    sampled = _read(res.sampled, num_logprobs, want_lp) if sample_seqs else []
    logits = iter(res.logits)
    for s, n, (lo, hi) in zip(seqs, counts, want):
        engine.counters["prompt_tokens"] += max(0, min(s.num_computed + n, s.num_prompt)
                                                - s.num_computed)
        s.num_computed += n
        if hi > lo:
            _take_prompt_logits(s, lo, hi, next(logits))
    for b, (token, lp) in zip(sample_seqs, sampled):
        _append(engine, seqs[b], token, lp)
    outputs = []
    for s in seqs:
        if s.status is Status.RUNNING and s.max_new == 0 and s.num_computed == s.num_tokens:
            finish(engine, s, "length")
        out = output_of(s)
        if out is not None:
            outputs.append(out)
    return outputs


def _read(sampled, num_logprobs: int, want_lp: bool) -> list[tuple[int, tuple | None]]:
    """The one host sync of the step: sampled ids, and their log-probabilities when asked."""
    ids = sampled.token_ids_B.tolist()
    if not want_lp:
        return [(t, None) for t in ids]
    lp = sampled.logprob_B.tolist()
    top_ids = sampled.top_ids_BN[:, :num_logprobs].tolist()
    top_lp = sampled.top_logprobs_BN[:, :num_logprobs].tolist()
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


def _append(engine, seq, token: int, lp) -> None:
    """A sampled token: append it, its log-probabilities and text; check the stop rules
    (EOS, then stop token ids, then stop strings in the text, then the length)."""
    params = seq.params
    seq.output_ids.append(token)
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
    elif len(seq.output_ids) >= seq.max_new:
        finish(engine, seq, "length")


def finish(engine, seq, reason: str) -> None:
    """End ``seq`` now: its pages go back to the pool at once; the text held back by the
    detokenizer (and by a stop matcher that did not match) is released."""
    seq.status, seq.finish_reason = Status.FINISHED, reason
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
    new = seq.output_ids[seq.num_emitted:]
    finished = seq.status is Status.FINISHED
    if not new and not finished:
        return None
    out = RequestOutput(seq.request_id, new, finished=finished,
                        finish_reason=seq.finish_reason if finished else None,
                        num_prompt_tokens=seq.num_prompt, num_output_tokens=len(seq.output_ids))
    if seq.detokenizer is not None:
        out.text_delta = seq.text[seq.num_text_emitted:]
        seq.num_text_emitted = len(seq.text)
    if seq.params.logprobs is not None:
        out.logprobs = seq.logprobs[seq.num_logprobs_emitted:]
        seq.num_logprobs_emitted = len(seq.logprobs)
    if seq.params.prompt_logprobs is not None and seq.num_emitted == 0:
        out.prompt_logprobs = [None] + seq.prompt_logprobs
    seq.num_emitted = len(seq.output_ids)
    if seq.num_emitted == 0 and not finished:
        return None
    return out
