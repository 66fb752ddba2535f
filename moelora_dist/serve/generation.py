"""``/v1/completions`` and ``/v1/chat/completions``: requests in, engine requests out, OpenAI
responses (whole or streamed as server-sent events) back.

One HTTP request becomes ``len(prompts) * n`` engine requests (choices), submitted together;
if any is refused, the ones already admitted are cancelled and the client gets the error. A
client that disconnects (while streaming, or while waiting for a whole response) has all its
choices cancelled at once: the engine frees their KV pages and unpins their adapter slot
before its next step.

Streams: ``data: {chunk}\\n\\n`` per step that changed a choice, then, when
``stream_options.include_usage`` is set, one chunk with empty ``choices`` and the usage, then
``data: [DONE]``. Chat streams open each choice with ``delta: {"role": "assistant"}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from starlette.requests import Request

from moelora_dist.engine.prompts import RequestError, prompt_ids
from moelora_dist.serve.loop import queue_sink
from moelora_dist.serve.protocol import (ChatRequest, CompletionRequest, RequestInvalid,
                                         check_neutral, choice_seed, parse_body,
                                         sampling_params)
from moelora_dist.serve.responses import (Choice, chat_logprobs, completion_logprobs,
                                          echo_logprobs, usage)

_ids = itertools.count()


class ClientGone(Exception):
    """The client of a whole (non-streamed) response disconnected; its choices are cancelled."""


class Run:
    """The choices of one HTTP request inside the engine (module docstring)."""

    def __init__(self, state, kind: str, model: str, adapter: str | None, choices, params,
                 n: int = 1):
        self.state, self.kind, self.model, self.adapter = state, kind, model, adapter
        self.n = n
        self.choices: list[Choice] = choices
        self.params = params
        self.by_rid = {c.request_id: c for c in choices}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.arrival = time.monotonic()
        self.last_token: dict[str, float] = {}
        self.num_done = 0
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{next(_ids)}"

    async def start(self) -> None:
        sink = queue_sink(self.queue)
        futs = [self.state.loop.add(c.request_id, c.prompt_ids, p, self.adapter, sink)
                for c, p in zip(self.choices, self.params)]
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.cancel()
            raise errors[0]

    def cancel(self) -> None:
        """Abort every choice that has not finished (idempotent)."""
        for c in self.choices:
            if c.finish_reason is None:
                self.state.loop.abort(c.request_id)

    async def next_output(self):
        """The next engine output of any choice, recorded into its choice."""
        out = await self.queue.get()
        if isinstance(out, BaseException):
            raise out
        choice = self.by_rid[out.request_id]
        now = time.monotonic()
        if out.new_token_ids:
            last = self.last_token.get(out.request_id)
            m = self.state.metrics
            if last is None:
                m.ttft.observe(now - self.arrival)
            else:
                m.tpot.observe((now - last) / len(out.new_token_ids))
            self.last_token[out.request_id] = now
        choice.absorb(out)
        if out.finished:
            self.num_done += 1
            self.state.metrics.e2e.observe(now - self.arrival)
        return choice, out

    @property
    def done(self) -> bool:
        return self.num_done == len(self.choices)

    def usage(self) -> dict:
        prompts = {c.index // self.n: c.num_prompt_tokens for c in self.choices}
        return usage(sum(prompts.values()), sum(len(c.token_ids) for c in self.choices))

    def record(self, status: str) -> None:
        self.state.metrics.requests.labels(self.model, status).inc()


async def _prompts(state, req) -> list[tuple[list[int], str]]:
    """``(token ids, text)`` of each prompt; texts and chats are encoded on the tokenizer
    thread (tokenizers are not safe to share between threads)."""
    codec, vocab = state.codec, state.vocab_size

    def encode(p, field):
        try:
            return prompt_ids(p, codec, vocab)
        except RequestError as exc:
            raise RequestInvalid(str(exc), field) from None

    aio = asyncio.get_running_loop()
    if isinstance(req, ChatRequest):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in req.messages]
        ids = await aio.run_in_executor(state.tokenizer_pool, encode, messages, "messages")
        return [(ids, "")]
    raw = req.prompt
    if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
        raw = [raw]
    if not raw:
        raise RequestInvalid("prompt is empty; give a text, token ids or a list of them",
                             "prompt")
    out = []
    for p in raw:
        ids = await aio.run_in_executor(state.tokenizer_pool, encode, p, "prompt")
        text = p if isinstance(p, str) else (
            await aio.run_in_executor(state.tokenizer_pool, codec.decode, ids)
            if codec is not None and req.echo else "")
        out.append((ids, text))
    return out


async def prepare(state, kind: str, body) -> tuple[Run, object]:
    """Check the body, resolve the model, build every choice; nothing is submitted yet."""
    req = parse_body(ChatRequest if kind == "chat" else CompletionRequest, body)
    check_neutral(req)
    adapter = state.resolve_model(req.model)
    prompts = await _prompts(state, req)
    field = "messages" if kind == "chat" else "prompt"
    if kind == "chat":
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs: true", "top_logprobs")
        prompt_lp = None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
        prompt_lp = logprobs if req.echo and logprobs is not None else None
    choices, params = [], []
    limit = state.max_model_len
    for i, (ids, text) in enumerate(prompts):
        want = max_tokens if max_tokens is not None else limit - len(ids)
        if max_tokens is None and want < 1:
            raise RequestInvalid(
                f"this model's maximum context length is {limit} tokens, but the {field} "
                f"alone have {len(ids)}; shorten the {field}", field)
        if len(ids) + max(want, 1) > limit:
            raise RequestInvalid(
                f"this model's maximum context length is {limit} tokens, but {len(ids) + want}"
                f" were asked ({len(ids)} in the {field}, {want} to generate); shorten the "
                f"{field} or lower max_tokens", field)
        for j in range(req.n):
            index = i * req.n + j
            choices.append(Choice(index, f"{'chat' if kind == 'chat' else 'cmpl'}-"
                                         f"{next(_ids)}", len(ids), ids, text))
            params.append(sampling_params(req, max_tokens=want, logprobs=logprobs,
                                          prompt_logprobs=prompt_lp,
                                          seed=choice_seed(req.seed, index)))
    return Run(state, kind, req.model, adapter, choices, params, req.n), req


async def watch_disconnect(request: Request, run: Run) -> None:
    """Cancel ``run`` when the client of a non-streamed request goes away, and wake the
    handler waiting for it (cancelled choices send no more outputs)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            run.queue.put_nowait(ClientGone())
            return


async def whole(run: Run, req, request: Request) -> dict:
    """Wait for every choice, then the whole response body."""
    watcher = asyncio.ensure_future(watch_disconnect(request, run))
    try:
        while not run.done:
            await run.next_output()
    except BaseException as exc:
        run.cancel()
        run.record("abort" if isinstance(exc, ClientGone) else "error")
        raise
    finally:
        watcher.cancel()
    run.record("ok")
    return body_of(run, req)


def body_of(run: Run, req) -> dict:
    tt = run.state.token_text
    out = []
    for c in run.choices:
        if run.kind == "chat":
            item = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs, tt) if req.logprobs else None,
                    "finish_reason": c.finish_reason}
        else:
            text = (c.prompt_text if req.echo else "") + c.text
            lp = None
            if req.logprobs is not None:
                lp = (echo_logprobs(c.prompt_ids, c.prompt_logprobs, c.logprobs, tt)
                      if req.echo else completion_logprobs(c.logprobs, tt))
            item = {"index": c.index, "text": text, "logprobs": lp,
                    "finish_reason": c.finish_reason}
        if req.return_token_ids:
            item["token_ids"] = list(c.token_ids)
            item["prompt_token_ids"] = list(c.prompt_ids)
        out.append(item)
    return {"id": run.id, "object": "chat.completion" if run.kind == "chat"
            else "text_completion", "created": run.created, "model": run.model,
            "choices": out, "usage": run.usage()}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream(run: Run, req):
    """Server-sent events of ``run`` (module docstring); cancels it if the client leaves."""
    tt = run.state.token_text
    chat = run.kind == "chat"
    head = {"id": run.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": run.created, "model": run.model}
    opened: set[int] = set()
    finished = False
    try:
        if chat:  # every choice opens with the assistant's role, as OpenAI streams do
            for c in run.choices:
                opened.add(c.index)
                yield _sse({**head, "choices": [{"index": c.index, "delta": {
                    "role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]})
        while not run.done:
            c, out = await run.next_output()
            if chat:
                delta = {"content": out.text_delta} if out.text_delta else {}
                item = {"index": c.index, "delta": delta,
                        "logprobs": chat_logprobs(out.logprobs or [], tt) if req.logprobs
                        else None, "finish_reason": c.finish_reason}
            else:
                text = out.text_delta
                if req.echo and c.index not in opened:
                    text = c.prompt_text + text
                opened.add(c.index)
                lp = None
                if req.logprobs is not None:
                    lp = (echo_logprobs(c.prompt_ids, out.prompt_logprobs, out.logprobs or [], tt)
                          if req.echo and out.prompt_logprobs is not None
                          else completion_logprobs(out.logprobs or [], tt))
                item = {"index": c.index, "text": text, "logprobs": lp,
                        "finish_reason": c.finish_reason}
            if req.return_token_ids:
                item["token_ids"] = list(out.new_token_ids)
            chunk = {**head, "choices": [item]}
            if req.stream_options is not None and req.stream_options.continuous_usage_stats:
                chunk["usage"] = run.usage()
            yield _sse(chunk)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"
        finished = True
        run.record("ok")
    except Exception:
        run.cancel()
        run.record("error")
        raise
    finally:
        if not finished:  # the client went away (the generator was closed) or an error
            run.cancel()
            run.record("abort")
