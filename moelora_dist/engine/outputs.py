"""What the engine hands back: incremental outputs per step, whole completions, and a metrics
snapshot. Plain dataclasses (a server turns them into JSON or server-sent events); the
``to_dict`` / ``from_dict`` pairs are their JSON form (what the server's frontend process
receives, ``moelora_dist/serve/wire.py``).

Finish reasons: ``"length"`` (``max_tokens`` reached), ``"eos"`` (an end-of-sequence token of
the model; it is the last output token, as Hugging Face ``generate`` keeps it), ``"stop"``
(a ``stop_token_ids`` token, kept, or a ``stop`` string, cut from the text), ``"abort"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one token under the model's raw distribution, and the top ones.

    ``top``: ``[(token id, logprob), ...]`` best first (``logprobs`` / ``prompt_logprobs``
    of them; empty when 0 were asked)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob, "top": self.top}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLogprob":
        return cls(d["token_id"], d["logprob"], [(t, lp) for t, lp in d["top"]])


def _lps_to_dict(items):
    return None if items is None else [None if it is None else it.to_dict() for it in items]


def _lps_from_dict(items):
    return None if items is None else [None if it is None else TokenLogprob.from_dict(it)
                                       for it in items]


@dataclass
class RequestOutput:
    """What one step added to one request.

    ``new_token_ids``: tokens generated in this step (usually one; none for a prefill chunk);
    ``text_delta``: their text (empty without a tokenizer); ``logprobs``: one
    :class:`TokenLogprob` per new token when the request asked; ``prompt_logprobs``: on the
    first output of a request that asked (``None`` for token 0, which has no context).
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def to_dict(self) -> dict:
        """The fields as JSON values (written by hand, not ``asdict``: it runs for every
        request of every step)."""
        return {"request_id": self.request_id, "new_token_ids": self.new_token_ids,
                "text_delta": self.text_delta, "logprobs": _lps_to_dict(self.logprobs),
                "prompt_logprobs": _lps_to_dict(self.prompt_logprobs),
                "finished": self.finished, "finish_reason": self.finish_reason,
                "num_prompt_tokens": self.num_prompt_tokens,
                "num_output_tokens": self.num_output_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "RequestOutput":
        return cls(d["request_id"], d["new_token_ids"], d["text_delta"],
                   _lps_from_dict(d["logprobs"]), _lps_from_dict(d["prompt_logprobs"]),
                   d["finished"], d["finish_reason"], d["num_prompt_tokens"],
                   d["num_output_tokens"])


@dataclass
class Completion:
    """The whole result of one request (:meth:`Engine.generate`): every output token."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str | None
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def absorb(self, out: RequestOutput) -> None:
        self.output_ids += out.new_token_ids
        if out.text_delta:
            self.text = (self.text or "") + out.text_delta
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass
class AdapterCounts:
    running: int = 0
    waiting: int = 0
    finished: int = 0


@dataclass
class EngineMetrics:
    """A snapshot of one replica's engine (its leader's view)."""

    running: int
    waiting: int
    prompt_tokens: int  # prompt tokens computed (recomputed ones after preemption included)
    output_tokens: int  # tokens generated
    pages_used: int
    pages_total: int
    page_size: int
    slots_used: int
    slots_total: int
    preemptions: int
    steps: int
    graph_steps: int
    adapters: dict[str, AdapterCounts] = field(default_factory=dict)
    decode_steps: int = 0  # steps of decoding sequences only (no prompt chunk)
    step_seconds: float = 0.0  # wall time inside Engine.step (scheduling, forward, outputs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineMetrics":
        return cls(**{**d, "adapters": {n: AdapterCounts(**c)
                                        for n, c in d["adapters"].items()}})
