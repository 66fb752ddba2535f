"""Request files of the ``logits`` and ``generate`` commands: JSONL in, checked before any work.

One JSON object per line, with exactly one prompt key::

    {"input_ids": [1, 2, 3] | "prompt": "text" | "messages": [{"role": "user", ...}],
     "adapter": "NAME" | null, "max_new_tokens": 8,
     "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1,
     "stop": ["\\n\\n"], "stop_token_ids": [2], "ignore_eos": false,
     "logprobs": 5, "prompt_logprobs": 0}

``max_new_tokens`` is required by ``generate``. The sampling keys are optional; unlike the
Python API's ``SamplingParams()``, ``temperature`` defaults to 0 here (greedy), so request
files written for the greedy command keep their outputs. ``logits`` reads the prompt and the
adapter (and accepts the other keys). ``prompt``/``messages`` need a tokenizer in the model
directory. Unknown keys are refused; every problem names its 0-based line and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moelora_dist.engine.sampling import SamplingError, SamplingParams
from moelora_dist.engine.prompts import RequestError
from moelora_dist.files.paths import read_text

PROMPT_KEYS = ("input_ids", "prompt", "messages")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "logprobs", "prompt_logprobs")
KNOWN_KEYS = PROMPT_KEYS + ("adapter", "max_new_tokens") + SAMPLING_KEYS


@dataclass
class RequestSpec:
    """One request line: its prompt (ids, text or messages), adapter, sampling settings, and
    the tokens to generate (``max_new_tokens``; 0 for ``logits`` and for a ``generate`` line
    that asks for none: it is answered without running, as before)."""

    prompt: object
    adapter: str | None
    sampling: SamplingParams
    line: int
    max_new_tokens: int = 0


def parse_line(obj, i: int, *, need_max_new_tokens: bool) -> RequestSpec:
    if not isinstance(obj, dict):
        raise RequestError(f"request line {i}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KNOWN_KEYS))
    if unknown:
        raise RequestError(f"request line {i}: unknown key(s) {unknown}; the known keys are "
                           f"{list(KNOWN_KEYS)}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise RequestError(f"request line {i}: give exactly one of {list(PROMPT_KEYS)}, got "
                           f"{given or 'none'}")
    prompt = obj[given[0]]
    if given[0] == "input_ids" and (not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise RequestError(f"request line {i}: 'input_ids' must be a list of integers")
    if given[0] == "prompt" and not isinstance(prompt, str):
        raise RequestError(f"request line {i}: 'prompt' must be a string")
    if given[0] == "messages" and (not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) for m in prompt)):
        raise RequestError(f"request line {i}: 'messages' must be a non-empty list of "
                           "{\"role\": ..., \"content\": ...} objects")
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(f"request line {i}: 'adapter' must be a string name or null")
    if need_max_new_tokens and "max_new_tokens" not in obj:
        raise RequestError(f"request line {i}: generate needs 'max_new_tokens'")
    mnt = obj.get("max_new_tokens", 0) if need_max_new_tokens else 0
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 0:
        raise RequestError(f"request line {i}: 'max_new_tokens' must be an integer >= 0")
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"request line {i}: 'ignore_eos' must be true or false")
    fields = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    if fields.get("temperature") is None:
        fields["temperature"] = 0.0
    try:
        sampling = SamplingParams.from_dict({"max_tokens": max(mnt, 1), **fields}) \
            if need_max_new_tokens else SamplingParams(max_tokens=1, temperature=0.0)
    except SamplingError as exc:
        raise RequestError(f"request line {i}: {exc}") from None
    return RequestSpec(prompt, adapter, sampling, i, mnt)


def parse_requests(lines, *, need_max_new_tokens: bool = False) -> list[RequestSpec]:
    """Parse JSONL text lines (blank lines are skipped but still counted)."""
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"request line {i}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise RequestError(f"request line {i}: JSON nested too deeply") from None
        out.append(parse_line(obj, i, need_max_new_tokens=need_max_new_tokens))
    if not out:
        raise RequestError("the request file holds no requests")
    return out


def read_requests(path: str, *, need_max_new_tokens: bool = False) -> list[RequestSpec]:
    """Parse a JSONL request file; every problem (unreadable file included) is one line."""
    lines = read_text(path, "request file").splitlines()
    try:
        return parse_requests(lines, need_max_new_tokens=need_max_new_tokens)
    except RequestError as exc:
        raise RequestError(f"{path}: {exc}") from None
