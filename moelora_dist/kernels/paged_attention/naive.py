"""Reference of the paged-attention family (also the CPU path); same signatures as ``ops.py``.

Legend: T new tokens of the step (all sequences, packed), B sequences, M block-table width,
P pages, S page size (tokens per page), N_q / N_kv query / kv heads (rank-local), D head dim,
g = N_q / N_kv query heads per kv head, L keys of one sequence.

Layout: ``k_pages``/``v_pages`` are ``[P, S, N_kv, D]``; token ``j`` of a sequence sits in page
``block_tables[b, j // S]`` at offset ``j % S`` ("slot" ``page * S + offset``). Sequence ``b``
owns new tokens ``[seg_indptr[b], seg_indptr[b+1])``, which are the *last* ``q_len`` of its
``kv_lens[b]`` keys (the cache already holds the keys before them: chunked prefill and decode
are one case). A sequence with ``kv_lens[b] == 0`` is padding: its outputs are zero.

Isolation: a sequence reads exactly its first ``ceil(L / S)`` block-table entries and, of the
last page, only the offsets below ``L``; a stale value in a reused page (even NaN) is never read.

Attention sinks (gpt-oss): one learned logit per query head joins every row's softmax and is
dropped after it (a row's weights then sum to less than 1), as transformers' eager attention
appends it to the scores.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, theta: float, max_positions: int, device=None):
    """``cos, sin``: ``[max_positions, D/2]`` fp32 of the default RoPE, computed as transformers
    does (``positions.float() * inv_freq`` then cos/sin), so indexing them equals computing."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / head_dim))
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: fp32 statistics, cast back, then scale (in x's dtype)."""
    return w * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x_TND: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    half = x_TND.shape[-1] // 2
    rot = torch.cat((-x_TND[..., half:], x_TND[..., :half]), dim=-1)
    return x_TND * cos_TD[:, None, :] + rot * sin_TD[:, None, :]


def rope_write(q_TND: torch.Tensor, k_TND: torch.Tensor, v_TND: torch.Tensor,
               positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
               slot_mapping_T: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
               q_norm_D: torch.Tensor | None = None, k_norm_D: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm of q and k (when the norm weights are given: Qwen3), rotary embedding
    of q and k at ``positions_T``, and the store of k and v into their pages.

    Args:
        q_TND ``[T, N_q, D]``, k_TND / v_TND ``[T, N_kv, D]``: the projections (any strides).
        positions_T: ``[T]`` int64 absolute position of each token.
        cos_PH / sin_PH: ``[max_positions, D/2]`` fp32 from :func:`rope_tables`.
        slot_mapping_T: ``[T]`` int64 ``page * S + offset`` of each token; ``-1``: not stored
            (padding rows of a static step).
        k_pages / v_pages: ``[P, S, N_kv, D]``, written in place.
        q_norm_D / k_norm_D: ``[D]`` per-head norm weights, or None for none.
    Returns:
        ``[T, N_q, D]`` the rotated queries, in q's dtype.
    """
    if q_norm_D is not None:
        q_TND = _rms_norm(q_TND, q_norm_D, eps)
        k_TND = _rms_norm(k_TND, k_norm_D, eps)
    dtype = q_TND.dtype
    cos = torch.cat((cos_PH, cos_PH), dim=-1)[positions_T].to(dtype)
    sin = torch.cat((sin_PH, sin_PH), dim=-1)[positions_T].to(dtype)
    q_TND, k_TND = _rope(q_TND, cos, sin), _rope(k_TND, cos, sin)
    keep = slot_mapping_T >= 0
    slots = slot_mapping_T[keep]
    N, D = k_pages.shape[2], k_pages.shape[3]
    k_pages.view(-1, N, D)[slots] = k_TND[keep].to(k_pages.dtype)
    v_pages.view(-1, N, D)[slots] = v_TND[keep].to(v_pages.dtype)
    return q_TND


def paged_attention(q_TND: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_tables_BM: torch.Tensor, kv_lens_B: torch.Tensor,
                    seg_indptr_B1: torch.Tensor, *, scale: float,
                    sliding_window: int | None = None, decode_only: bool = False,
                    sinks_N: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged keys (module docstring).

    Args:
        q_TND: ``[T, N_q, D]`` rotated queries; k_pages / v_pages ``[P, S, N_kv, D]``.
        block_tables_BM: ``[B, M]`` int32 page ids (entries past a sequence's pages unread).
        kv_lens_B: ``[B]`` int keys of each sequence after this step (its new tokens included).
        seg_indptr_B1: ``[B+1]`` int32 offsets of each sequence's new tokens in ``q``.
        scale: softmax scale (``D ** -0.5``); sliding_window: a key ``k`` is seen from query
            position ``p`` when ``p - window < k <= p``; decode_only: unused here (the kernel's
            tile choice), kept for one signature; sinks_N: ``[N_q]`` sink logits or None.
    Returns:
        ``[T, N_q, D]`` in q's dtype (fp32 softmax); rows of padding sequences are zero.
    """
    T, Nq, D = q_TND.shape
    S, Nk = k_pages.shape[1], k_pages.shape[2]
    g = Nq // Nk
    out = torch.zeros_like(q_TND)
    seg, lens = seg_indptr_B1.tolist(), kv_lens_B.tolist()
    dev = q_TND.device
    for b, L in enumerate(lens):
        q0, q1 = seg[b], seg[b + 1]
        Q = q1 - q0
        if Q == 0 or L == 0:
            continue
        pages = block_tables_BM[b, : (L + S - 1) // S].long()
        k_LND = k_pages[pages].reshape(-1, Nk, D)[:L].float()
        v_LND = v_pages[pages].reshape(-1, Nk, D)[:L].float()
        q_pos = torch.arange(L - Q, L, device=dev)
        k_pos = torch.arange(L, device=dev)
        mask_QL = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask_QL &= k_pos[None, :] > q_pos[:, None] - sliding_window
        q_QNgD = q_TND[q0:q1].float().view(Q, Nk, g, D)
        s = torch.einsum("qngd,lnd->ngql", q_QNgD, k_LND) * scale
        s = s.masked_fill(~mask_QL, float("-inf"))
        if sinks_N is not None:  # one more column per head, dropped after the softmax
            sink = sinks_N.float().view(Nk, g, 1, 1).expand(Nk, g, Q, 1)
            p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :L]
        else:
            p = torch.softmax(s, dim=-1)
        o = torch.einsum("ngql,lnd->qngd", p, v_LND)
        out[q0:q1] = o.reshape(Q, Nq, D).to(out.dtype)
    return out
