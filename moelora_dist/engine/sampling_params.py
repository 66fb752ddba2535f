"""What a request asks of sampling, checked once: :class:`SamplingParams` and its error.

    params = SamplingParams.from_dict({"temperature": 0.7, "top_p": 0.9, "max_tokens": 64})
    params.validate(vocab_size)      # SamplingError naming the field and the fix
    seed = request_seed(params)      # the request's seed, or one drawn at admission

Conventions (those of vLLM's ``SamplingParams``): ``temperature == 0`` is greedy; ``top_k``
``-1`` or ``0`` is off (a ``top_k`` past the vocabulary keeps it all); ``top_p == 1`` and
``min_p == 0`` are off; ``logprobs = n`` returns the chosen token's logprob and the top ``n``
(``0``: the chosen one only); ``stop`` strings are not part of the output.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields

from moelora_dist.errors import MoeloraError

MAX_LOGPROBS = 20  # top-n logprobs a request may ask for (vLLM's default max_logprobs)
_SEED_RANGE = (-(1 << 63), 1 << 64)


class SamplingError(MoeloraError):
    """A sampling parameter that cannot work; the message names the field and the fix."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. Every field is checked at construction (vocabulary-independent
    rules) and by :meth:`validate` (the rest); ``stop`` given as one string or a list becomes a
    tuple, ``stop_token_ids`` a tuple."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if isinstance(stop, list):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if _is_int(value):
                object.__setattr__(self, name, float(value))
        self._check()

    @property
    def greedy(self) -> bool:
        """Argmax of the logits: ``temperature == 0`` or ``top_k == 1``."""
        return self.temperature == 0 or self.top_k == 1

    def _check(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", self.max_tokens, "an integer >= 1 (tokens to generate)")
        if not _is_number(self.temperature) or self.temperature < 0:
            _fail("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", self.top_k, "an integer >= 1, or -1 / 0 for off")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if self.seed is not None and (not _is_int(self.seed)
                                      or not _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]):
            _fail("seed", self.seed, "an integer in [-2**63, 2**64), or null for a random one")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s
                                                        for s in self.stop):
            _fail("stop", self.stop, "a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "a list of token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "true or false")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                _fail(name, value, f"an integer in [0, {MAX_LOGPROBS}] (top-n logprobs), "
                                   "or null for none")

    def validate(self, vocab_size: int, max_logprobs: int = MAX_LOGPROBS) -> None:
        """Every rule, including those that need the model's vocabulary size; raises
        :class:`SamplingError` naming the first field that breaks one."""
        self._check()
        for t in self.stop_token_ids:
            if t >= vocab_size:
                _fail("stop_token_ids", t, f"token ids below the vocabulary size {vocab_size}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            limit = min(max_logprobs, vocab_size)
            if value is not None and value > limit:
                _fail(name, value, f"at most {limit} (top-n logprobs this engine returns)")

    @classmethod
    def from_dict(cls, obj: dict) -> "SamplingParams":
        """From a JSON object of the fields above; a ``null`` value means the default (except
        for ``seed``, ``logprobs``, ``prompt_logprobs``, whose default is null)."""
        if not isinstance(obj, dict):
            raise SamplingError(f"sampling parameters must be a JSON object of "
                                f"{', '.join(KNOWN_KEYS)}; got a {type(obj).__name__}")
        unknown = [k for k in obj if k not in KNOWN_KEYS]
        if unknown:
            raise SamplingError(
                f"unknown sampling parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)}; known: {', '.join(KNOWN_KEYS)}")
        return cls(**{k: v for k, v in obj.items() if v is not None or k in _NULLABLE})

    def to_dict(self) -> dict:
        """The fields as JSON values (tuples become lists); ``from_dict`` reads it back."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


KNOWN_KEYS = tuple(f.name for f in fields(SamplingParams))
_NULLABLE = ("seed", "logprobs", "prompt_logprobs")


def _fail(name: str, value, want: str):
    raise SamplingError(f"sampling parameter {name!r} must be {want}; got {value!r}")


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or, when it gave none, one drawn here from
    the OS's random source. The engine calls this once, when it admits the request, and keeps
    the number with the request (and broadcasts it with the step plan), so a request's tokens
    stay reproducible within its life (preemption and recomputation included) without a global
    generator."""
    return params.seed if params.seed is not None else secrets.randbits(63)
