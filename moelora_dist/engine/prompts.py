"""A request's prompt as token ids, and every check a request must pass before it is queued.

A prompt is token ids (``[int, ...]``), a text (``str``: the model's tokenizer encodes it) or
chat messages (``[{"role": ..., "content": ...}, ...]``: the model's chat template formats
them). Text needs a tokenizer in the model directory and the ``text`` extra
(``pip install 'moelora_dist[text]'``); without one, token ids only, said in one line.
"""

from __future__ import annotations

from moelora_dist.errors import MoeloraError


class RequestError(MoeloraError):
    """A request the engine refuses; the message names the field and the fix."""


def prompt_ids(prompt, codec, vocab_size: int, codec_error: Exception | None = None
               ) -> list[int]:
    """Token ids of ``prompt`` (module docstring); ``RequestError`` for anything else.
    ``codec_error``: why the model's tokenizer did not load, said when text needs it."""
    if isinstance(prompt, str):
        if codec is None:
            raise codec_error or RequestError(
                "a text prompt needs a tokenizer: the model directory has none; give token ids")
        ids = list(codec.encode(prompt))
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict)
                                                             for m in prompt):
        if codec is None:
            raise codec_error or RequestError(
                "chat messages need a tokenizer with a chat template: the model directory has "
                "none; give token ids")
        ids = list(codec.apply_chat_template(list(prompt)))
    else:
        ids = _token_ids(prompt)
    if not ids:
        raise RequestError("input_ids is empty; give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def _token_ids(prompt) -> list[int]:
    if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestError("a prompt is a list of token ids, a text or a list of chat "
                           f"messages; got {type(prompt).__name__}")
    return [int(t) for t in prompt]


def check_request(ids: list[int], params, adapter: str | None, adapters, vocab_size: int,
                  max_model_len: int, num_pages: int, page_size: int, max_new: int) -> None:
    """Everything that would make the request fail later, said now (one line each);
    ``max_new``: the tokens it generates (``params.max_tokens``, 0 for prompt logits)."""
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(f"adapter {adapter!r}: give a registered name or None")
    if not adapters.servable(adapter):
        known = sorted(set(adapters.registry) - adapters.removing)
        why = "is being removed" if adapter in adapters.removing else "is not registered"
        raise RequestError(f"unknown adapter {adapter!r} ({why}); registered: "
                           f"{known or 'none'} (add it with --adapter NAME=DIR)")
    params.validate(vocab_size)
    total = len(ids) + max_new
    if total > max_model_len:
        raise RequestError(f"{len(ids)} prompt + {max_new} new tokens exceed the "
                           f"model's {max_model_len} positions (max_model_len)")
    need = -(-total // page_size)
    if need > num_pages:
        raise RequestError(f"{len(ids)} prompt + {max_new} new tokens need {need} KV "
                           f"pages of {page_size} tokens but the pool has {num_pages}; raise "
                           "--num-pages or --gpu-memory-utilization, or ask for fewer tokens")
