"""One request inside the engine: its tokens, how far its KV is computed, and its outputs.

A sequence's tokens are its prompt followed by what it generated. ``num_computed`` tokens have
their keys and values in the sequence's pages; the scheduler gives it the next ones in chunks
(prefill) or one at a time (decode). A forward that reaches the last known token samples the
next one. Preemption frees the pages and sets ``num_computed`` back to 0: the sequence is
recomputed later over prompt *and* output (recompute), and since sampling is keyed by the
request's seed and the token's index, it continues exactly where it left off.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request (``params``: its ``SamplingParams``).

    ``arrival``: the engine's admission counter; lower is older (first served, last
    preempted). ``want_prompt_logits``: keep the ``[L, V]`` logits of every prompt position
    (the ``logits`` job). ``logprobs``: per generated token ``(token logprob, top ids, top
    logprobs)`` when asked; ``prompt_logprobs``: the same for prompt tokens 1.. (token 0 has
    none), filled once even if the prompt is recomputed.
    """

    request_id: str
    arrival: int
    prompt_ids: list[int]
    params: object
    adapter: str | None
    seed: int
    max_new: int = 0  # tokens to generate (0: the logits job, the prompt only)
    want_prompt_logits: bool = False
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    text: str = ""
    detokenizer: object = None
    stop_matcher: object = None
    num_emitted: int = 0  # output tokens already returned by step()
    # Tokens sampled by steps still in flight (engine/step.py): the last num_pending
    # entries of output_ids are placeholders until their step is read back.
    num_pending: int = 0
    num_logprobs_emitted: int = 0
    num_text_emitted: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def num_prompt_logits(self) -> int:
        """Prompt positions whose logits are kept so far (the ``logits`` job)."""
        return sum(int(t.shape[0]) for t in self.prompt_logits)
