"""Requests of the ``logits`` and ``generate`` commands: JSONL in, validated before any work.

One JSON object per line::

    {"input_ids": [1, 2, 3], "adapter": "NAME" | null, "max_new_tokens": 8}

``max_new_tokens`` is read by ``generate`` only (required there). ``ignore_eos`` (optional,
``generate``) keeps generating past an end-of-sequence token. Every problem is reported with
its 0-based line number and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moelora_dist.errors import MoeloraError
from moelora_dist.files.paths import read_text

KNOWN_KEYS = ("input_ids", "adapter", "max_new_tokens", "ignore_eos")


class RequestError(MoeloraError):
    """A request file or request the runner refuses; the message names the line and the fix."""


@dataclass
class Request:
    """One request: prompt token ids, adapter name (None: base model), generation length."""

    input_ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 0
    ignore_eos: bool = False
    line: int | None = None  # 0-based line in the request file (output keys use it)


def parse_requests(lines, *, need_max_new_tokens: bool = False) -> list[Request]:
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
        if not isinstance(obj, dict):
            raise RequestError(f"request line {i}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(KNOWN_KEYS))
        if unknown:
            raise RequestError(f"request line {i}: unknown key(s) {unknown}; the known keys are "
                               f"{list(KNOWN_KEYS)}")
        ids = obj.get("input_ids")
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError(f"request line {i}: 'input_ids' must be a list of integers")
        adapter = obj.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError(f"request line {i}: 'adapter' must be a string name or null")
        mnt = obj.get("max_new_tokens", 0)
        if need_max_new_tokens and "max_new_tokens" not in obj:
            raise RequestError(f"request line {i}: generate needs 'max_new_tokens'")
        if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 0:
            raise RequestError(f"request line {i}: 'max_new_tokens' must be an integer >= 0")
        ignore_eos = obj.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError(f"request line {i}: 'ignore_eos' must be true or false")
        out.append(Request(ids, adapter, mnt, ignore_eos, line=i))
    if not out:
        raise RequestError("the request file holds no requests")
    return out


def read_requests(path: str, *, need_max_new_tokens: bool = False) -> list[Request]:
    """Parse a JSONL request file; every problem (unreadable file included) is one line."""
    lines = read_text(path, "request file").splitlines()
    try:
        return parse_requests(lines, need_max_new_tokens=need_max_new_tokens)
    except RequestError as exc:
        raise RequestError(f"{path}: {exc}") from None


def validate_requests(requests: list[Request], *, vocab_size: int, adapters,
                      max_len: int | None = None) -> None:
    """Check every request against the model and the registered adapters, before any work.

    Args:
        adapters: the names of the registered adapters.
        max_len: longest sequence the runner accepts (prompt + new tokens), if bounded.
    """
    known = sorted(adapters)
    for idx, r in enumerate(requests):
        i = idx if r.line is None else r.line
        if not r.input_ids:
            raise RequestError(f"request {i}: input_ids is empty; give at least one token")
        bad = [t for t in r.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"request {i}: token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {vocab_size})")
        if r.adapter is not None and r.adapter not in known:
            raise RequestError(f"request {i}: unknown adapter {r.adapter!r}; registered: "
                               f"{known or 'none'} (add it with --adapter NAME=DIR)")
        if max_len is not None and len(r.input_ids) + r.max_new_tokens > max_len:
            raise RequestError(f"request {i}: {len(r.input_ids)} prompt + {r.max_new_tokens} new "
                               f"tokens exceed the model's {max_len} positions")
