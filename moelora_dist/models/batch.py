"""One forward's token layout and the KV cache.

Legend: B requests in this forward, T new tokens (all requests, concatenated), Q the longest
new-token run of a request, L the longest key run (cached + new), C cache rows, N kv heads
(rank-local), D head dim.

Tokens are packed request after request (request ``b`` owns ``[seg_indptr[b], seg_indptr[b+1])``)
so that the dense and MoE layers see one ``[T, H]`` matrix. Attention needs them per request:
:class:`ForwardBatch` carries the index maps (``req_T``, ``j_T``) that scatter the packed tokens
into a padded ``[B, Q]`` grid and back, and the boolean mask ``[B, 1, Q, L]`` (causal on absolute
positions, optional sliding window). It is built once per forward and shared by every layer.
Prefill (many new tokens) and decode (one per request) are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Everything a layer needs to know about the tokens of one forward pass.

    ``positions_T`` ``[T]`` int64 absolute positions; ``seg_indptr_B1`` ``[B+1]`` int32;
    ``req_T`` / ``j_T`` ``[T]`` int64 request and offset-in-request of each token;
    ``cache_rows_B`` ``[B]`` int64 KV-cache row of each request (None: rows ``0..B-1``);
    ``kv_lens_B`` ``[B]`` int64 keys each request attends to after this forward;
    ``attn_mask_B1QL`` ``[B, 1, Q, L]`` bool, True = may attend.
    """

    positions_T: torch.Tensor
    seg_indptr_B1: torch.Tensor
    req_T: torch.Tensor
    j_T: torch.Tensor
    cache_rows_B: torch.Tensor | None
    kv_lens_B: torch.Tensor
    attn_mask_B1QL: torch.Tensor
    max_q: int
    max_kv: int

    def grouped_mask(self, g: int, window: int | None = None) -> torch.Tensor:
        """The mask tiled ``g`` times along queries, ``[B, 1, g*Q, L]``, for attention that
        stacks the ``g`` query heads of one kv head along the query axis (made once per
        forward and window, shared by every layer)."""
        cache = self.__dict__.setdefault("_grouped", {})
        if (g, window) not in cache:
            cache[(g, window)] = self.mask_for(window).repeat(1, 1, g, 1)
        return cache[(g, window)]

    def mask_for(self, window: int | None) -> torch.Tensor:
        """``[B, 1, Q, L]`` bool: the mask with a sliding ``window`` on top (a query at
        position ``i`` sees keys ``i - window < j <= i``), for models whose layers differ
        (gpt-oss: windows on even layers). Built on the device from the causal mask itself
        (a query's position is its count of visible keys minus one), so a CUDA-graph step
        computes it too. Only for a batch built without a model-wide ``sliding_window``."""
        if window is None:
            return self.attn_mask_B1QL
        cache = self.__dict__.setdefault("_windowed", {})
        if window not in cache:
            m = self.attn_mask_B1QL
            q_pos = m.sum(-1, keepdim=True) - 1  # causal rows see keys 0..pos
            k_pos = torch.arange(m.shape[-1], device=m.device)
            cache[window] = m & (k_pos > q_pos - window)
        return cache[window]

    @property
    def num_requests(self) -> int:
        return int(self.kv_lens_B.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions_T.shape[0])

    @property
    def last_token_index_B(self) -> torch.Tensor:
        """``[B]`` int64 index into the packed tokens of each request's last new token."""
        return self.seg_indptr_B1[1:].long() - 1

    @classmethod
    def build(cls, new_lens: list[int], prefix_lens: list[int], device,
              cache_rows: list[int] | None = None,
              sliding_window: int | None = None) -> "ForwardBatch":
        """Index maps and mask for requests that add ``new_lens[b]`` tokens after
        ``prefix_lens[b]`` cached ones. ``cache_rows=None`` means request ``b`` uses row ``b``."""
        if len(new_lens) != len(prefix_lens) or not new_lens:
            raise ValueError("need one new length and one prefix length per request, B >= 1")
        if min(new_lens) < 1:
            raise ValueError("every request in a forward must add at least one token")
        B = len(new_lens)
        new = torch.tensor(new_lens, dtype=torch.int64)
        prefix = torch.tensor(prefix_lens, dtype=torch.int64)
        seg = torch.zeros(B + 1, dtype=torch.int64)
        seg[1:] = torch.cumsum(new, 0)
        req_T = torch.repeat_interleave(torch.arange(B), new)
        j_T = torch.arange(int(seg[-1])) - seg[req_T]
        positions_T = prefix[req_T] + j_T
        kv_lens = prefix + new
        max_q, max_kv = int(new.max()), int(kv_lens.max())
        q_pos_BQ = prefix[:, None] + torch.arange(max_q)[None, :]  # absolute query positions
        k_pos_L = torch.arange(max_kv)
        mask = k_pos_L[None, None, :] <= q_pos_BQ[:, :, None]
        if sliding_window is not None:
            mask &= k_pos_L[None, None, :] > q_pos_BQ[:, :, None] - sliding_window
        # Padded query slots (j >= new_len) see key 0 only, so their softmax has no empty row
        # (which would be NaN); their outputs are never read.
        pad_BQ = torch.arange(max_q)[None, :] >= new[:, None]
        mask[pad_BQ] = k_pos_L[None, :] == 0
        rows = None if cache_rows is None or cache_rows == list(range(B)) else torch.tensor(
            cache_rows, dtype=torch.int64, device=device)
        return cls(
            positions_T=positions_T.to(device), seg_indptr_B1=seg.to(torch.int32).to(device),
            req_T=req_T.to(device), j_T=j_T.to(device), cache_rows_B=rows,
            kv_lens_B=kv_lens.to(device), attn_mask_B1QL=mask[:, None].to(device),
            max_q=max_q, max_kv=max_kv)

    @classmethod
    def static_decode(cls, positions_B: torch.Tensor, max_len: int,
                      sliding_window: int | None = None) -> "ForwardBatch":
        """One new token per request, request ``b`` in KV-cache row ``b``, attending over all
        ``max_len`` cached keys with the mask doing the rest: every shape is fixed by
        ``(B, max_len)`` and every index is computed on the device from ``positions_B``, so
        the forward can be captured in a CUDA graph and replayed with new positions.

        ``positions_B``: ``[B]`` int64 position of each new token (a padding row uses 0, so
        it sees exactly one key and nothing is NaN).
        """
        B, dev = int(positions_B.shape[0]), positions_B.device
        k_pos_L = torch.arange(max_len, device=dev)
        mask_BL = k_pos_L[None, :] <= positions_B[:, None]
        if sliding_window is not None:
            mask_BL &= k_pos_L[None, :] > positions_B[:, None] - sliding_window
        req_T = torch.arange(B, device=dev)
        return cls(positions_T=positions_B, seg_indptr_B1=torch.arange(
                       B + 1, dtype=torch.int32, device=dev),
                   req_T=req_T, j_T=torch.zeros_like(req_T), cache_rows_B=None,
                   kv_lens_B=positions_B + 1, attn_mask_B1QL=mask_BL[:, None, None, :],
                   max_q=1, max_kv=max_len)


class KVCache:
    """Per-layer key/value buffers ``[C, L_max, N, D]``: one row per live request.

    Row-major by request so that one request's keys are contiguous and a decode step of
    requests ``0..B-1`` reads a plain slice ``k[:B, :L]`` with no gather.
    """

    def __init__(self, num_layers: int, num_rows: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, v_head_dim: int | None = None):
        shape = (num_rows, max_len, num_kv_heads, head_dim)
        # MLA caches its keys and values expanded per head, values narrower than keys.
        v_shape = shape[:3] + (v_head_dim or head_dim,)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.num_rows = num_rows

    def check(self, batch: ForwardBatch) -> None:
        if batch.max_kv > self.max_len:
            raise ValueError(f"sequence of {batch.max_kv} tokens exceeds the KV cache length "
                             f"{self.max_len}")
        if batch.cache_rows_B is None and batch.num_requests > self.num_rows:
            raise ValueError(f"{batch.num_requests} requests but the KV cache has "
                             f"{self.num_rows} rows")

    def write_and_read(self, layer: int, batch: ForwardBatch, k_TND: torch.Tensor,
                       v_TND: torch.Tensor):
        """Store the new keys/values, return every request's keys/values ``[B, N, L, D]``."""
        rows = batch.cache_rows_B
        row_T = batch.req_T if rows is None else rows[batch.req_T]
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache[row_T, batch.positions_T] = k_TND.to(k_cache.dtype)
        v_cache[row_T, batch.positions_T] = v_TND.to(v_cache.dtype)
        L = batch.max_kv
        if rows is None:
            k, v = k_cache[: batch.num_requests, :L], v_cache[: batch.num_requests, :L]
        else:
            k, v = k_cache[rows, :L], v_cache[rows, :L]
        return k.transpose(1, 2), v.transpose(1, 2)
