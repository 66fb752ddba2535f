"""Stand-ins for the sampling and text modules until they are merged (branch ``textsample``:
``engine/sampling.py`` and ``engine/text.py``), with their fixed interfaces.

Only greedy decoding runs here: parameters that would need random sampling are refused with
a message saying so (never ignored), and no tokenizer is ever found (token ids only). The
engine imports these names from this one module; the merge replaces the import and deletes it.

Legend: B rows (one per sampled sequence), V vocab, N top log-probabilities per row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from moelora_dist.errors import MoeloraError


class SamplingError(MoeloraError):
    """Sampling parameters that cannot be honoured; names the field and the fix."""


class TextError(MoeloraError):
    """A prompt or tokenizer problem."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (the interface of ``engine.sampling``)."""

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise SamplingError(f"max_tokens={self.max_tokens!r}: must be an integer >= 0")
        if not self.greedy:
            raise SamplingError(
                f"temperature={self.temperature} needs random sampling, which this build does "
                "not have yet (the sampling module is not merged); use temperature 0 (greedy)")
        if self.stop:
            raise SamplingError("stop strings need the text module (not merged yet); use "
                                "stop_token_ids")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise SamplingError(f"stop_token_ids {bad} lie outside the vocabulary "
                                f"[0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= min(vocab_size, 20):
                raise SamplingError(f"{name}={n}: must lie in [0, {min(vocab_size, 20)}]")

    @classmethod
    def from_dict(cls, obj: dict) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise SamplingError(f"unknown sampling field(s) {unknown}; known: {sorted(names)}")
        kw = dict(obj)
        for k in ("stop", "stop_token_ids"):
            if k in kw:
                v = kw[k]
                kw[k] = (v,) if isinstance(v, (str, int)) else tuple(v)
        return cls(**kw)


@dataclass
class SamplingBatch:
    """Per-row device tensors of one step (graph-safe: fixed shapes, copied into)."""

    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], steps: list[int],
                    device) -> "SamplingBatch":
        return cls(torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                device=device))

    def copy_into(self, static: "SamplingBatch") -> None:
        static.rows[: self.rows.shape[0]].copy_(self.rows)

    @classmethod
    def empty(cls, max_rows: int, device) -> "SamplingBatch":
        return cls(torch.zeros(max_rows, dtype=torch.float32, device=device))


@dataclass
class SampleOutput:
    token_ids_B: torch.Tensor
    logprob_B: torch.Tensor
    top_ids_BN: torch.Tensor
    top_logprobs_BN: torch.Tensor


def sample(logits_BV: torch.Tensor, batch: SamplingBatch, num_logprobs: int = 0) -> SampleOutput:
    """Greedy: the argmax of each row, with the raw distribution's log-probabilities."""
    logp = torch.log_softmax(logits_BV.float(), dim=-1)
    ids = torch.argmax(logits_BV, dim=-1)
    top_lp, top_ids = torch.topk(logp, num_logprobs, dim=-1)
    return SampleOutput(ids, logp.gather(1, ids[:, None])[:, 0], top_ids, top_lp)


class TextCodec:
    """No tokenizer in this build: :meth:`from_model_dir` always says None."""

    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_model_dir(cls, model_dir) -> "TextCodec | None":
        return None
