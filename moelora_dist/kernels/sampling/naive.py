"""PyTorch reference of the sampling kernel (and the path on CPU): counter-based uniforms,
Gumbel-max over the kept tokens, the chosen token's raw logprob.

    token_B, logprob_B, lse_B = sample_rows(logits_BV, temperature_B, min_p_B, seed_B, step_B,
                                            row_max_B, tau_B)

Legend: B rows, V vocabulary. No Triton import. The hash works on int64 tensors holding 32-bit
values: every product is split in 16-bit halves so it never overflows int64 (a wrapped signed
product would be undefined behaviour in C++ and could differ between CPU and GPU builds).
"""

from __future__ import annotations

import torch

from moelora_dist.kernels.sampling.common import (HASH_M1, HASH_M2, MASK32, SALT_KEY, SALT_SEED,
                                                  UNIFORM_SCALE, UNIFORM_SHIFT)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on int64 tensors of 32-bit values (see common.py)."""
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_M1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_M2)
    return x ^ (x >> 16)


def row_keys(seed_B: torch.Tensor, step_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k0_B, k1_B)`` int64 (32-bit values) from ``seed_B`` int64 (the seed mod 2**64 as a
    signed int64) and ``step_B`` int64 (taken mod 2**32)."""
    seed_B, step_B = seed_B.long(), step_B.long()
    lo, hi = seed_B & MASK32, (seed_B >> 32) & MASK32  # arithmetic shift, then the low word
    k = lowbias32(hi ^ SALT_SEED)
    k = lowbias32(k ^ lo)
    k0 = lowbias32(k ^ (step_B & MASK32))
    return k0, lowbias32(k0 ^ SALT_KEY)


def uniforms(seed_B: torch.Tensor, step_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """``u_BV`` fp32 in (0, 1): entry ``[b, i]`` depends only on ``(seed_B[b], step_B[b], i)``."""
    k0, k1 = row_keys(seed_B, step_B)
    i_V = torch.arange(vocab, dtype=torch.int64, device=seed_B.device)
    h = lowbias32(lowbias32(i_V[None, :] ^ k0[:, None]) ^ k1[:, None])
    # 2 * (h >> 9) + 1 < 2**24 is exact in fp32, and so is the power-of-two scale
    return ((h >> UNIFORM_SHIFT) * 2 + 1).to(torch.float32) * UNIFORM_SCALE


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` (fp32), in ``[-2.8, 16.6]`` for our uniforms."""
    return -torch.log(-torch.log(u))


def keep_threshold(temperature_B: torch.Tensor, min_p_B: torch.Tensor, row_max_B: torch.Tensor,
                   tau_B: torch.Tensor | None) -> torch.Tensor:
    """The raw-logit threshold ``tau_B`` (fp32) a row keeps tokens at or above: the larger of the
    top-k/top-p threshold ``tau_B`` and min-p's ``max + T log(min_p)`` (``p_i >= min_p p_max``
    on ``softmax(l / T)``); ``-inf`` (keep all) for greedy rows and where no filter is set."""
    t = temperature_B.float()
    m = row_max_B.float()
    mp = min_p_B.float()
    on = (mp > 0) & (t > 0)  # 0 * log(0) would be NaN: only rows with both set
    tau_min = torch.where(on, m + t * torch.log(torch.where(on, mp, 1.0)), float("-inf"))
    if tau_B is not None:
        tau_min = torch.maximum(tau_min, tau_B.float())
    return torch.where(t > 0, tau_min, float("-inf"))


def sample_rows(logits_BV: torch.Tensor, temperature_B: torch.Tensor, min_p_B: torch.Tensor,
                seed_B: torch.Tensor, step_B: torch.Tensor, row_max_B: torch.Tensor,
                tau_B: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row by Gumbel-max over the kept tokens.

    ``logits_BV`` any float dtype; ``temperature_B``, ``min_p_B`` fp32 (``T == 0``: greedy, the
    score is the logit itself, so the token is ``argmax`` with the first index on ties);
    ``seed_B``, ``step_B`` int64; ``row_max_B`` the row's largest logit; ``tau_B`` fp32 or
    None (see :func:`keep_threshold`). Token ``b`` is ``argmax_i l_i + T g_i`` over
    ``l_i >= tau`` (which is ``argmax l_i / T + g_i``: a draw from ``softmax(l / T)`` over
    the kept tokens). Returns ``token_B`` int64, ``logprob_B`` fp32 (``log_softmax`` of the
    unmodified logits at the token) and ``lse_B`` fp32 (``logsumexp`` of the unmodified row).
    """
    B, V = logits_BV.shape
    l = logits_BV.float()
    t = temperature_B.float()[:, None]
    tau = keep_threshold(temperature_B, min_p_B, row_max_B, tau_B)[:, None]
    g = gumbel(uniforms(seed_B, step_B, V))
    score = torch.where(l >= tau, l + t * g, float("-inf"))
    token = score.argmax(-1)
    lse = torch.logsumexp(l, -1)
    logprob = l.gather(1, token[:, None]).squeeze(1) - lse
    return token, logprob, lse
