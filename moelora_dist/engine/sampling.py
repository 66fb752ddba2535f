"""Per-request sampling on the device, one pass, no host sync (CUDA-graph capturable).

    batch = SamplingBatch.from_params(params, seeds, steps, device)   # per-row device tensors
    out = sample(logits_BV, batch, num_logprobs=5)                     # SampleOutput

**Random numbers.** Row ``b`` draws with a counter-based hash of ``(seeds[b], steps[b], i)``
per vocabulary index ``i`` (``kernels/sampling/common.py``), turned into Gumbel noise; the
token is ``argmax_i l_i / T + g_i`` over the tokens the filters keep (Gumbel-max: an exact draw
from ``softmax(l / T)`` on them). So a row's token depends only on its logits, its parameters,
its seed and its step (the index of the token being generated: 0 for the first output token)
-- never on the other rows or on a global generator. A request without a seed gets one drawn
when the engine admits it (:func:`request_seed`). The same numbers on CPU and GPU; only a
near-tie of two scores (fp32 rounding of ``log``) can come out differently there.

**Filters**, in Hugging Face ``generate``'s order: temperature, top-k, top-p (on the top-k
survivors), min-p. vLLM applies min-p before top-k/top-p; the two orders differ only when
top-p and min-p are both set. A full sort runs only when some row has top-p, a ``topk`` only
when some row has top-k (decided on the host from the parameters, see ``filter_width``).

**Logprobs** are those of the *unmodified* logits: ``log_softmax(logits)`` at the chosen token
and the top ``n`` (vLLM's default, ``raw_logprobs``): they describe the model, whatever the
request's temperature and filters, and they equal what Hugging Face returns as
``output_logits`` put through ``log_softmax``.

Legend: B rows, V vocabulary, N top-n logprobs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from moelora_dist.engine.sampling_params import (MAX_LOGPROBS, SamplingError,  # noqa: F401
                                                 SamplingParams, request_seed)
from moelora_dist.kernels.constants import next_power_of_2
from moelora_dist.kernels.device import to_device
from moelora_dist.kernels.sampling import naive
from moelora_dist.kernels.sampling.filters import filter_thresholds

FULL = sys.maxsize  # filter_width: the whole vocabulary (a sort)


class SamplingBatch:
    """Per-row sampling inputs as device tensors, and the host facts that pick the code path.

    ``floats_B3`` fp32 ``(temperature, top_p, min_p)``, ``ints_B3`` int64 ``(top_k, seed,
    step)``; greedy rows (``temperature == 0`` or ``top_k == 1``) have ``temperature = 0`` and
    no filters; ``top_k == 0`` is off. Host facts: ``filter_width`` (``0`` no top-k/top-p, a
    power of two ``>=`` every row's top-k, or :data:`FULL` when some row has top-p) and
    ``all_greedy``. A CUDA graph captures :func:`sample` on a static batch from :meth:`empty`
    and replays after :meth:`copy_into`; the static batch's host facts must cover the copied
    one's (:meth:`covers`).
    """

    def __init__(self, floats_B3: torch.Tensor, ints_B3: torch.Tensor, filter_width: int,
                 all_greedy: bool):
        assert floats_B3.shape == ints_B3.shape and floats_B3.shape[1:] == (3,)
        self.floats_B3, self.ints_B3 = floats_B3, ints_B3
        self.filter_width, self.all_greedy = int(filter_width), bool(all_greedy)

    num_rows = property(lambda self: self.floats_B3.shape[0])
    temperature_B = property(lambda self: self.floats_B3[:, 0])
    top_p_B = property(lambda self: self.floats_B3[:, 1])
    min_p_B = property(lambda self: self.floats_B3[:, 2])
    top_k_B = property(lambda self: self.ints_B3[:, 0])
    seed_B = property(lambda self: self.ints_B3[:, 1])
    step_B = property(lambda self: self.ints_B3[:, 2])

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], steps: list[int],
                    device) -> "SamplingBatch":
        """Row ``b`` samples with ``params[b]``, the seed ``seeds[b]`` (the request's own or the
        one the engine drew at admission: :func:`request_seed`) and ``steps[b]``, the index of
        the token being generated. Two host-to-device copies."""
        if not len(params) == len(seeds) == len(steps):
            raise ValueError(f"one seed and one step per row: {len(params)} params, "
                             f"{len(seeds)} seeds, {len(steps)} steps")
        floats, ints, width = [], [], 0
        for p, seed, step in zip(params, seeds, steps):
            if p.greedy:
                floats.append((0.0, 1.0, 0.0))
                ints.append((0, _int64(seed), step))
                continue
            k = p.top_k if p.top_k > 1 else 0
            floats.append((p.temperature, p.top_p, p.min_p))
            ints.append((k, _int64(seed), step))
            if p.top_p < 1:
                width = FULL
            elif k:
                width = max(width, next_power_of_2(k))
        all_greedy = all(p.greedy for p in params)
        return cls(_to_device(floats, torch.float32, device),
                   _to_device(ints, torch.int64, device), width, all_greedy)

    @classmethod
    def empty(cls, max_rows: int, device, *, filter_width: int = FULL,
              all_greedy: bool = False) -> "SamplingBatch":
        """A static batch for a graph: ``max_rows`` greedy rows whose host facts cover any
        batch by default (a graph captured on it sorts; pass a smaller ``filter_width`` or
        ``all_greedy=True`` to capture a cheaper variant)."""
        floats = torch.zeros(max_rows, 3, dtype=torch.float32, device=device)
        floats[:, 1] = 1.0
        return cls(floats, torch.zeros(max_rows, 3, dtype=torch.int64, device=device),
                   filter_width, all_greedy)

    def covers(self, other: "SamplingBatch") -> bool:
        """Whether a graph captured on ``self`` samples ``other``'s rows as :func:`sample`
        would: enough rows, a filter width at least ``other``'s, greedy-only only if ``other``
        is."""
        return (other.num_rows <= self.num_rows and other.filter_width <= self.filter_width
                and (other.all_greedy or not self.all_greedy))

    def copy_into(self, static: "SamplingBatch") -> None:
        """Write these rows into the first rows of ``static`` (a graph's inputs). Later rows
        keep their previous values (valid parameters; the caller ignores their tokens)."""
        if not static.covers(self):
            raise ValueError(
                f"a static sampling batch of {static.num_rows} rows, filter width "
                f"{static.filter_width}, all_greedy={static.all_greedy} cannot sample "
                f"{self.num_rows} rows of width {self.filter_width}, "
                f"all_greedy={self.all_greedy}; capture a graph on a covering batch")
        n = self.num_rows
        static.floats_B3[:n].copy_(self.floats_B3, non_blocking=True)
        static.ints_B3[:n].copy_(self.ints_B3, non_blocking=True)


def _int64(seed: int) -> int:
    """The seed mod 2**64 as a signed int64 (the bits the hash reads)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _to_device(rows: list[tuple], dtype: torch.dtype, device) -> torch.Tensor:
    return to_device(torch.tensor(rows, dtype=dtype).reshape(len(rows), 3), device)


@dataclass
class SampleOutput:
    """``token_ids_B`` int64; ``logprob_B`` fp32 (raw log-softmax at the token);
    ``top_ids_BN`` int64 and ``top_logprobs_BN`` fp32, the ``N = num_logprobs`` most likely
    tokens, most likely first (``N == 0``: empty)."""

    token_ids_B: torch.Tensor
    logprob_B: torch.Tensor
    top_ids_BN: torch.Tensor
    top_logprobs_BN: torch.Tensor


def sample(logits_BV: torch.Tensor, batch: SamplingBatch, num_logprobs: int = 0, *,
           backend: str | None = None) -> SampleOutput:
    """One token per row of ``logits_BV`` (``[B, V]``, any float dtype, ``B ==
    batch.num_rows``), with the chosen token's logprob and the top ``num_logprobs``.

    ``backend``: ``"triton"`` (default on CUDA) or ``"torch"`` (default elsewhere; the
    reference math of ``kernels/sampling/naive.py``). No host sync; what runs depends only on
    shapes, ``num_logprobs`` and the batch's host facts, so a CUDA graph captures it.
    """
    B, V = logits_BV.shape
    assert B == batch.num_rows, (B, batch.num_rows)
    choice = backend or ("triton" if logits_BV.device.type == "cuda" else "torch")
    if choice == "triton":
        from moelora_dist.kernels.sampling import ops as impl
    elif choice == "torch":
        impl = naive
    else:
        raise ValueError(f"unknown sampling backend {choice!r}; pick 'triton' or 'torch'")
    if batch.all_greedy and choice == "torch":
        token = logits_BV.argmax(-1)
        lse = torch.logsumexp(logits_BV.float(), -1)
        logprob = logits_BV.gather(1, token[:, None]).squeeze(1).float() - lse
    else:
        width = 0 if batch.all_greedy else min(batch.filter_width, V)
        row_max, tau = filter_thresholds(logits_BV, batch.temperature_B, batch.top_k_B,
                                         batch.top_p_B, width)
        token, logprob, lse = impl.sample_rows(logits_BV, batch.temperature_B, batch.min_p_B,
                                               batch.seed_B, batch.step_B, row_max, tau)
    top_ids, top_lp = top_logprobs(logits_BV, lse, num_logprobs)
    return SampleOutput(token, logprob, top_ids, top_lp)


def top_logprobs(logits_BV: torch.Tensor, lse_B: torch.Tensor, num_logprobs: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_ids_BN int64, top_logprobs_BN fp32)``: the ``N`` largest raw logprobs of each
    row, given the row's log-sum-exp ``lse_B`` (fp32)."""
    B = logits_BV.shape[0]
    if num_logprobs <= 0:
        return (torch.empty(B, 0, dtype=torch.int64, device=logits_BV.device),
                torch.empty(B, 0, dtype=torch.float32, device=logits_BV.device))
    vals, ids = torch.topk(logits_BV, num_logprobs, dim=-1)
    return ids, vals.float() - lse_B[:, None]


def prompt_logprobs(logits_TV: torch.Tensor, next_ids_T: torch.Tensor, num_logprobs: int
                    ) -> SampleOutput:
    """Logprobs of given tokens (a prompt's: ``logits_TV[t]`` predicts ``next_ids_T[t]``, int64),
    in the convention of :func:`sample`; ``token_ids_B`` is ``next_ids_T``."""
    lse = torch.logsumexp(logits_TV.float(), -1)
    logprob = logits_TV.gather(1, next_ids_T.long()[:, None]).squeeze(1).float() - lse
    top_ids, top_lp = top_logprobs(logits_TV, lse, num_logprobs)
    return SampleOutput(next_ids_T.long(), logprob, top_ids, top_lp)
