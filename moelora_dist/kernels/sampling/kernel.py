"""Triton kernels of the sampling family (host glue in ``ops.py``, reference in ``naive.py``).

``_sample_chunk_kernel``: one program per (row, chunk of ``CHUNK`` vocabulary entries) reads
the logits once and writes the chunk's best Gumbel score and its index, and the chunk's max and
sum of ``exp(l - max)``. ``_sample_combine_kernel``: one program per row reduces the chunks
(first index on ties, as ``torch.argmax``) and writes the token, its logprob and the row's
log-sum-exp. The hash works on uint32 (wrapping products), bit for bit the int64 emulation of
``naive.py``.
"""

import triton
import triton.language as tl

from moelora_dist.kernels.sampling import common

_M1 = tl.constexpr(common.HASH_M1)
_M2 = tl.constexpr(common.HASH_M2)
_SALT_SEED = tl.constexpr(common.SALT_SEED)
_SALT_KEY = tl.constexpr(common.SALT_KEY)
_SHIFT = tl.constexpr(common.UNIFORM_SHIFT)
_SCALE = tl.constexpr(common.UNIFORM_SCALE)


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


@triton.jit
def _row_keys(seed, step):
    s = seed.to(tl.uint64)  # the int64 seed's bits
    k = _lowbias32((s >> 32).to(tl.uint32) ^ _SALT_SEED)
    k = _lowbias32(k ^ (s & 0xFFFFFFFF).to(tl.uint32))
    k0 = _lowbias32(k ^ step.to(tl.uint32))
    return k0, _lowbias32(k0 ^ _SALT_KEY)


@triton.jit
def _uniform(index_u32, k0, k1):
    h = _lowbias32(_lowbias32(index_u32 ^ k0) ^ k1)
    return ((h >> _SHIFT).to(tl.float32) * 2.0 + 1.0) * _SCALE


@triton.jit
def _uniforms_kernel(seed_ptr, step_ptr, out_ptr, vocab, stride_seed, stride_step, stride_ob,
                     CHUNK: tl.constexpr):
    """out[b, i] = the uniform of (seed[b], step[b], i), fp32 (tests pin it to naive.py)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    k0, k1 = _row_keys(tl.load(seed_ptr + row * stride_seed),
                       tl.load(step_ptr + row * stride_step))
    tl.store(out_ptr + row * stride_ob + offs, _uniform(offs.to(tl.uint32), k0, k1),
             mask=offs < vocab)


@triton.jit
def _sample_chunk_kernel(logits_ptr, temp_ptr, min_p_ptr, seed_ptr, step_ptr, row_max_ptr,
                         tau_ptr, best_ptr, best_idx_ptr, part_max_ptr, part_sum_ptr,
                         vocab, num_chunks, stride_lb, stride_lv, stride_temp, stride_min_p,
                         stride_seed, stride_step, stride_max, stride_tau,
                         HAS_TAU: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk partials of one row: best of ``l + T g`` over ``l >= tau`` and its index, and
    ``max l``, ``sum exp(l - max l)`` of the unmodified logits (all fp32)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < vocab
    l = tl.load(logits_ptr + row * stride_lb + offs * stride_lv, mask=valid,
                other=float("-inf")).to(tl.float32)
    temp = tl.load(temp_ptr + row * stride_temp).to(tl.float32)
    min_p = tl.load(min_p_ptr + row * stride_min_p).to(tl.float32)
    row_max = tl.load(row_max_ptr + row * stride_max).to(tl.float32)
    # the threshold of naive.keep_threshold, per row
    on = (min_p > 0) & (temp > 0)
    tau = tl.where(on, row_max + temp * tl.log(tl.where(on, min_p, 1.0)), float("-inf"))
    if HAS_TAU:
        tau = tl.maximum(tau, tl.load(tau_ptr + row * stride_tau).to(tl.float32))
    tau = tl.where(temp > 0, tau, float("-inf"))
    k0, k1 = _row_keys(tl.load(seed_ptr + row * stride_seed),
                       tl.load(step_ptr + row * stride_step))
    g = -tl.log(-tl.log(_uniform(offs.to(tl.uint32), k0, k1)))
    score = tl.where(valid & (l >= tau), l + temp * g, float("-inf"))
    best = tl.max(score, axis=0)
    best_idx = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int64) + chunk * CHUNK
    m = tl.max(l, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # an all -inf chunk sums to 0, not NaN
    s = tl.sum(tl.where(valid, tl.exp(l - m_safe), 0.0), axis=0)
    out = row * num_chunks + chunk
    tl.store(best_ptr + out, best)
    tl.store(best_idx_ptr + out, best_idx)
    tl.store(part_max_ptr + out, m)
    tl.store(part_sum_ptr + out, s)


@triton.jit
def _sample_combine_kernel(logits_ptr, best_ptr, best_idx_ptr, part_max_ptr, part_sum_ptr,
                           token_ptr, logprob_ptr, lse_ptr, num_chunks, stride_lb, stride_lv,
                           BLOCK_C: tl.constexpr):
    """Per row: the first chunk with the best score gives the token; the chunks' (max, sum)
    give ``lse``; ``logprob = l[token] - lse``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    valid = offs < num_chunks
    base = row * num_chunks
    best = tl.load(best_ptr + base + offs, mask=valid, other=float("-inf"))
    c = tl.argmax(best, axis=0, tie_break_left=True)
    token = tl.load(best_idx_ptr + base + c)
    m = tl.load(part_max_ptr + base + offs, mask=valid, other=float("-inf"))
    s = tl.load(part_sum_ptr + base + offs, mask=valid, other=0.0)
    mm = tl.max(m, axis=0)
    mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
    lse = mm_safe + tl.log(tl.sum(tl.where(valid, s * tl.exp(m - mm_safe), 0.0), axis=0))
    l_tok = tl.load(logits_ptr + row * stride_lb + token * stride_lv).to(tl.float32)
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, l_tok - lse)
    tl.store(lse_ptr + row, lse)
