"""Triton kernel of the top-k routers (imports triton only; host glue in ``ops.py``).

One program routes ``BLOCK_T`` tokens: it loads their logits rows once, takes the softmax in
fp32 (when ``SOFTMAX_FIRST``), then picks the k largest scores by k rounds of a row maximum;
among equal scores the lowest expert index wins, and a picked expert is masked out of the next
rounds, so the ids come in descending order of score, as ``torch.topk(sorted=True)`` gives
them. The weights are renormalized (``RENORMALIZE``) or, for the top-k-then-softmax router,
soft-maxed over the k and rounded to the logits' dtype (transformers computes that softmax in
the logits' dtype). A score that is NaN never matches the maximum: such a round writes the
sentinel id ``-1`` and weight 0, which the expert kernels skip, never an id out of range.
"""

import triton
import triton.language as tl


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts,
                       stride_lt, stride_le, stride_wt, stride_it,
                       TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                       RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    # Rows past the end read the last row (finite), so no lane computes -inf - -inf.
    safe = tl.minimum(rows, num_tokens - 1)
    raw = tl.load(logits_ptr + safe[:, None] * stride_lt + cols[None, :] * stride_le,
                  mask=col_ok[None, :], other=float("-inf"))
    score = raw.to(tl.float32)
    if SOFTMAX_FIRST:
        top = tl.max(score, axis=1)
        e = tl.exp(score - top[:, None])
        e = tl.where(col_ok[None, :], e, 0.0)
        score = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
        score = tl.where(col_ok[None, :], score, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32) - 1
    for k in tl.static_range(TOP_K):
        best = tl.max(score, axis=1)
        hit = (score == best[:, None]) & col_ok[None, :]
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        found = idx < num_experts
        w = tl.where(kcols[None, :] == k, tl.where(found, best, 0.0)[:, None], w)
        ids = tl.where(kcols[None, :] == k, tl.where(found, idx, -1)[:, None], ids)
        score = tl.where(cols[None, :] == idx[:, None], float("-inf"), score)
    k_ok = kcols[None, :] < TOP_K
    if SOFTMAX_FIRST:
        if RENORMALIZE:
            w = tl.math.div_rn(w, tl.sum(tl.where(k_ok, w, 0.0), axis=1)[:, None])
    else:
        valid = k_ok & (ids >= 0)
        top = tl.max(tl.where(valid, w, float("-inf")), axis=1)
        e = tl.where(valid, tl.exp(w - top[:, None]), 0.0)
        w = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
        w = w.to(raw.dtype).to(tl.float32)
    out_mask = row_ok[:, None] & k_ok
    tl.store(weights_ptr + rows[:, None] * stride_wt + kcols[None, :], w, mask=out_mask)
    tl.store(ids_ptr + rows[:, None] * stride_it + kcols[None, :], ids, mask=out_mask)
