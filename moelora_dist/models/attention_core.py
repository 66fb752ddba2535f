"""Scaled dot-product attention over a batch of requests, for every served attention variant.

Legend: T packed new tokens, B requests, Q padded new tokens per request, L keys per request,
N_q / N_kv query / kv heads on this rank, g = N_q / N_kv, D query/key dim, E value dim.

:func:`attend` scatters the packed queries to ``[B, Q]``, stacks the ``g`` query heads of one
kv head along the query axis (the kv tensors are read as they are: no repeat), runs SDPA and
gathers back. What the families add:

- a value dim ``E`` other than ``D`` (MLA: ``v_head_dim`` 128 vs ``qk_head_dim`` 192);
- a sliding window per layer (gpt-oss), from :meth:`ForwardBatch.grouped_mask`;
- attention sinks (gpt-oss): one learned logit per head that joins every row's softmax and
  is then dropped, so a row's weights sum to less than 1. Here the sink is one extra key of
  zeros with a zero value whose score comes from an additive mask column holding the head's
  sink logit: SDPA's softmax then includes it, and its value adds nothing. (The extra key
  costs a copy of the keys per layer; a paged kernel would add the logit in its own softmax.)

:func:`attend_reference` is the same math written out (scores, mask, sink column, softmax in
fp32, drop, weights @ v), the way transformers' eager attention computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN attention compiles an execution plan per shape, and decode grows the kv length every
# step: on an H100 (torch 2.11) the first decode step at each new length took 70-110 ms for four
# layers against 12 ms with the memory-efficient kernel. Every other backend takes any shape.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _to_grid(q_TND: torch.Tensor, batch, num_kv: int) -> torch.Tensor:
    """``[T, N_q, D]`` -> ``[B, N_kv, g*Q, D]`` (padded query slots are zeros)."""
    T, num_q, D = q_TND.shape
    B, Q, g = batch.num_requests, batch.max_q, num_q // num_kv
    if Q == 1:  # decode: one token per request, already in [B, Q] order; no scatter
        q_BQND = q_TND[:, None]
    else:
        q_BQND = q_TND.new_zeros(B, Q, num_q, D)
        q_BQND[batch.req_T, batch.j_T] = q_TND
    return q_BQND.view(B, Q, num_kv, g, D).permute(0, 2, 3, 1, 4).reshape(B, num_kv, g * Q, D)


def _from_grid(out: torch.Tensor, batch, num_q: int) -> torch.Tensor:
    """``[B, N_kv, g*Q, E]`` -> ``[T, N_q, E]``."""
    B, num_kv, gQ, E = out.shape
    Q, g = batch.max_q, num_q // num_kv
    out_BQNE = out.view(B, num_kv, g, Q, E).permute(0, 3, 1, 2, 4).reshape(B, Q, num_q, E)
    return out_BQNE[:, 0] if Q == 1 else out_BQNE[batch.req_T, batch.j_T]


def _sink_mask(mask_B1GL: torch.Tensor, sinks_N: torch.Tensor, num_kv: int, Q: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, N_kv, g*Q, L+1]`` mask: 0 / -inf for the keys, the sink logit of each
    row's head in the last column."""
    B, _, gQ, L = mask_B1GL.shape
    g = gQ // Q
    out = torch.zeros(B, num_kv, gQ, L + 1, dtype=dtype, device=mask_B1GL.device)
    out[..., :L].masked_fill_(~mask_B1GL, float("-inf"))
    sink_col = sinks_N.to(dtype).view(num_kv, g, 1).expand(num_kv, g, Q).reshape(num_kv, gQ)
    out[..., L] = sink_col
    return out


def attend(q_TND: torch.Tensor, k_BNLD: torch.Tensor, v_BNLE: torch.Tensor, batch, *,
           scale: float, window: int | None = None,
           sinks_N: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the packed queries over each request's keys.

    Args:
        q_TND: ``[T, N_q, D]`` queries (rotated); k_BNLD ``[B, N_kv, L, D]``,
            v_BNLE ``[B, N_kv, L, E]``: every request's keys and values.
        batch: the forward's :class:`~moelora_dist.models.batch.ForwardBatch` (index maps
            and mask).
        scale: the softmax scale; window: this layer's sliding window (None: causal);
        sinks_N: ``[N_q]`` sink logits of this rank's query heads, or None.
    Returns:
        ``[T, N_q, E]`` in ``q_TND.dtype``.
    """
    num_q, num_kv = q_TND.shape[1], k_BNLD.shape[1]
    g = num_q // num_kv
    q_grp = _to_grid(q_TND, batch, num_kv)
    mask = batch.grouped_mask(g, window)
    if sinks_N is not None:
        B, _, L, D = k_BNLD.shape
        k_BNLD = torch.cat([k_BNLD, k_BNLD.new_zeros(B, num_kv, 1, D)], dim=2)
        v_BNLE = torch.cat([v_BNLE, v_BNLE.new_zeros(B, num_kv, 1, v_BNLE.shape[-1])], dim=2)
        mask = _sink_mask(mask, sinks_N, num_kv, batch.max_q, q_grp.dtype)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q_grp, k_BNLD, v_BNLE, attn_mask=mask,
                                             scale=scale)
    return _from_grid(out, batch, num_q)


def attend_reference(q_TND: torch.Tensor, k_BNLD: torch.Tensor, v_BNLE: torch.Tensor, batch,
                     *, scale: float, window: int | None = None,
                     sinks_N: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`attend` written out: per request and head, softmax over the visible keys (and
    the sink) in fp32, the sink's weight dropped. Same arguments and result."""
    T, num_q, _ = q_TND.shape
    num_kv = k_BNLD.shape[1]
    g = num_q // num_kv
    mask_BQL = batch.mask_for(window)[:, 0]
    out = q_TND.new_zeros(T, num_q, v_BNLE.shape[-1])
    for t in range(T):
        b, j = int(batch.req_T[t]), int(batch.j_T[t])
        keys = mask_BQL[b, j].nonzero().flatten()
        for h in range(num_q):
            k, v = k_BNLD[b, h // g, keys].float(), v_BNLE[b, h // g, keys].float()
            scores = (k @ q_TND[t, h].float()) * scale
            if sinks_N is not None:
                scores = torch.cat([scores, sinks_N[h].float().view(1)])
            p = torch.softmax(scores, dim=0)[: len(keys)]
            out[t, h] = (p @ v).to(out.dtype)
    return out
