"""OpenAI-shaped JSON out of engine outputs: completions, chat completions, their stream chunks,
logprobs, usage, and the error object.

    choice = Choice(index=0, request_id="cmpl-1-0", num_prompt_tokens=5)
    choice.absorb(request_output)                  # tokens, text, logprobs, finish reason
    completion_body(rid, created, model, choices, ...)   # {"object": "text_completion", ...}

Finish reasons follow OpenAI's words: the engine's ``eos`` and ``stop`` (a stop string or a
``stop_token_ids`` token) are ``"stop"``, ``length`` is ``"length"``; a request cancelled by
the server's shutdown ends with ``"abort"`` (vLLM's word).

Token strings in logprobs: the token's own text from the tokenizer (special tokens
included); without a tokenizer ``"token_id:<id>"`` (vLLM's ``return_tokens_as_token_ids``
form), so a token-id client still reads every id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TokenText:
    """Text of single tokens for logprobs (module docstring); cached per id."""

    def __init__(self, codec):
        self.codec = codec
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if self.codec is None:
            return f"token_id:{token_id}"
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.codec.decode([token_id],
                                                             skip_special_tokens=False)
        return text


@dataclass
class Choice:
    """One choice of a response: one engine request (``request_id``) for one prompt."""

    index: int
    request_id: str
    num_prompt_tokens: int
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None

    def absorb(self, out) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.text_delta
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = FINISH.get(out.finish_reason, out.finish_reason)


def completion_logprobs(items, token_text: TokenText, offset: int = 0) -> dict:
    """The completions API's ``logprobs`` object over ``items`` (TokenLogprob, or None for a
    prompt's first token, which has no context)."""
    tokens, lps, tops, offsets = [], [], [], []
    for it in items:
        if it is None:
            continue
        offsets.append(offset)
        s = token_text(it.token_id)
        offset += len(s)
        tokens.append(s)
        lps.append(it.logprob)
        tops.append({token_text(t): lp for t, lp in it.top} if it.top else None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], prompt_lps, items, token_text: TokenText) -> dict:
    """``logprobs`` of an echoed completion: the prompt's tokens (the first one with null
    logprobs) followed by the generated ones."""
    body = completion_logprobs([p for p in (prompt_lps or [])[1:]] + list(items), token_text,
                               len(token_text(prompt_ids[0])))
    body["tokens"].insert(0, token_text(prompt_ids[0]))
    body["token_logprobs"].insert(0, None)
    body["top_logprobs"].insert(0, None)
    body["text_offset"].insert(0, 0)
    return body


def chat_logprobs(items, token_text: TokenText) -> dict:
    """The chat API's ``logprobs`` object: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}``."""
    def entry(t, lp):
        s = token_text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(it.token_id, it.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in it.top]} for it in items]}


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}
