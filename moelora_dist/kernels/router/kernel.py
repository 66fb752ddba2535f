"""Triton kernels of the top-k routers (imports triton only; host glue in ``ops.py``).

``_route_rows`` routes ``BLOCK_T`` tokens' logits rows held in registers: the softmax in fp32
(when ``SOFTMAX_FIRST``), then the k largest scores by k rounds of a row maximum; among equal
scores the lowest expert index wins, and a picked expert is masked out of the next rounds, so
the ids come in descending order of score, as ``torch.topk(sorted=True)`` gives them. The
weights are renormalized (``RENORMALIZE``) or, for the top-k-then-softmax router, soft-maxed
over the k and rounded to the logits' dtype (transformers computes that softmax in the logits'
dtype). A score that is NaN never matches the maximum: such a round writes the sentinel id
``-1`` and weight 0, which the expert kernels skip, never an id out of range.

Two kernels share it, so their routing cannot drift apart:

- ``_route_topk_kernel``: logits given (one program per ``BLOCK_T`` tokens);
- ``_gemm_softmax_topk_kernel``: the router GEMM too, for a few tokens (decode). Program
  ``(t, c)`` computes the logits of token block ``t`` and expert chunk ``c`` (fp32 dot over a
  loop on H, rounded once to the logits' dtype, as a GEMM with a bf16 output rounds them),
  stores them to the ``[T, E]`` logits buffer, then counts itself in ``counter[t]`` (acq_rel);
  the program that arrives last for its token block loads the block's whole rows, routes them
  and sets the counter back to 0 for the next launch (or graph replay). The rows hold the same
  numbers whichever chunk arrives last, so the result does not depend on the order.
"""

import triton
import triton.language as tl


@triton.jit
def _route_rows(raw, rows, row_ok, cols, col_ok, num_experts, weights_ptr, ids_ptr,
                stride_wt, stride_it, TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Route the logits ``raw [BLOCK_T, BLOCK_E]`` (``-inf`` past ``num_experts``) and store
    the weights (fp32) and ids (int32) of the rows ``row_ok``."""
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


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts,
                       stride_lt, stride_le, stride_wt, stride_it,
                       TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                       RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    # Rows past the end read the last row (finite), so no lane computes -inf - -inf.
    safe = tl.minimum(rows, num_tokens - 1)
    raw = tl.load(logits_ptr + safe[:, None] * stride_lt + cols[None, :] * stride_le,
                  mask=col_ok[None, :], other=float("-inf"))
    _route_rows(raw, rows, rows < num_tokens, cols, col_ok, num_experts, weights_ptr, ids_ptr,
                stride_wt, stride_it, TOP_K, SOFTMAX_FIRST, RENORMALIZE, BLOCK_T, BLOCK_E,
                BLOCK_K)


@triton.jit
def _gemm_softmax_topk_kernel(x_ptr, w_ptr, part_ptr, logits_ptr, counter_ptr, weights_ptr,
                              ids_ptr, num_tokens, num_experts, hidden, h_per_split,
                              stride_xt, stride_xh, stride_we, stride_wh, stride_lt, stride_le,
                              stride_wt, stride_it,
                              TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                              NUM_CHUNKS: tl.constexpr, H_SPLITS: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    experts = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    expert_ok = experts < num_experts
    hh = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    h_lo = pid_h * h_per_split
    h_hi = tl.minimum(h_lo + h_per_split, hidden)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        h_ok = h0 + hh < h_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xt + (h0 + hh)[None, :] * stride_xh,
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + experts[:, None] * stride_we + (h0 + hh)[None, :] * stride_wh,
                    mask=expert_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    # fp32 partial of this program's hidden columns: [H_SPLITS, num_tokens, num_experts].
    part = part_ptr + (pid_h * num_tokens + rows[:, None]) * num_experts + experts[None, :]
    tl.store(part, acc, mask=row_ok[:, None] & expert_ok[None, :])
    # Every thread's stores precede the count (barrier), and the count releases them to the
    # last arriver, whose acquire makes the other programs' stores visible to its loads.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel")
    if arrived == NUM_CHUNKS * H_SPLITS - 1:
        cols = tl.arange(0, BLOCK_E)
        col_ok = cols < num_experts
        safe = tl.minimum(rows, num_tokens - 1)  # a real row: finite, written by this block
        total = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        # The partials in split order (the same sum whatever order the programs ran in),
        # .cg: from L2, never a line this SM's L1 may hold from before the others wrote.
        for sp in tl.static_range(H_SPLITS):
            total += tl.load(part_ptr + (sp * num_tokens + safe[:, None]) * num_experts
                             + cols[None, :], mask=col_ok[None, :], other=0.0,
                             cache_modifier=".cg")
        # One rounding to the logits' dtype, as the GEMM's bf16 output is rounded.
        logits = total.to(logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, logits,
                 mask=row_ok[:, None] & col_ok[None, :])
        raw = tl.where(col_ok[None, :], logits, float("-inf"))
        _route_rows(raw, rows, row_ok, cols, col_ok, num_experts, weights_ptr, ids_ptr,
                    stride_wt, stride_it, TOP_K, True, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K)
        tl.atomic_xchg(counter_ptr + pid_t, 0, sem="relaxed")
