"""One forward's token layout over a paged KV cache, and the cache's pages.

Legend: B sequences in this forward, T new tokens (all sequences, concatenated), M block-table
width, P pages, S page size (tokens per page), N kv heads (rank-local), D head dim.

Tokens are packed sequence after sequence (sequence ``b`` owns ``[seg_indptr[b],
seg_indptr[b+1])``) so that the dense and MoE layers see one ``[T, H]`` matrix. A sequence's
new tokens are the last ones of its ``kv_lens[b]`` keys: the cache holds the ones before
(chunked prefill and decode are one case). Its keys live in the pages of its block-table row;
token ``j`` of the sequence is slot ``block_tables[b, j // S] * S + j % S``. Which pages a
sequence holds is decided by the engine's page allocator (:mod:`moelora_dist.engine.pages`);
here they are only read and written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Everything a layer needs to know about the tokens of one forward.

    ``positions_T`` ``[T]`` int64 absolute positions; ``seg_indptr_B1`` ``[B+1]`` int32;
    ``kv_lens_B`` ``[B]`` int32 keys of each sequence after this forward (0: a padding row);
    ``block_tables_BM`` ``[B, M]`` int32 page ids; ``slot_mapping_T`` ``[T]`` int64 the slot
    each new token's key and value go to (``-1``: not stored, padding); ``decode_only``
    (host): every sequence adds exactly one token (picks the attention kernel's tiles).
    """

    positions_T: torch.Tensor
    seg_indptr_B1: torch.Tensor
    kv_lens_B: torch.Tensor
    block_tables_BM: torch.Tensor
    slot_mapping_T: torch.Tensor
    decode_only: bool = False

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens_B.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions_T.shape[0])

    @property
    def last_token_index_B(self) -> torch.Tensor:
        """``[B]`` int64 index into the packed tokens of each sequence's last new token."""
        return (self.seg_indptr_B1[1:].long() - 1).clamp(min=0)

    @classmethod
    def build(cls, new_lens: list[int], prefix_lens: list[int], block_tables: list[list[int]],
              page_size: int, device) -> "ForwardBatch":
        """The layout of sequences that add ``new_lens[b]`` tokens after ``prefix_lens[b]``
        cached ones, in the pages ``block_tables[b]`` (enough for all their tokens)."""
        if not (len(new_lens) == len(prefix_lens) == len(block_tables)) or not new_lens:
            raise ValueError("need one new length, prefix length and block table per sequence")
        if min(new_lens) < 1:
            raise ValueError("every sequence in a forward must add at least one token")
        positions, slots, seg = [], [], [0]
        for n, p, pages in zip(new_lens, prefix_lens, block_tables):
            if len(pages) * page_size < n + p:
                raise ValueError(f"a sequence of {n + p} tokens needs more than its "
                                 f"{len(pages)} pages of {page_size}")
            positions += range(p, p + n)
            slots += [pages[j // page_size] * page_size + j % page_size for j in range(p, p + n)]
            seg.append(seg[-1] + n)
        width = max(len(b) for b in block_tables)
        table = torch.zeros(len(block_tables), width, dtype=torch.int32)
        for b, pages in enumerate(block_tables):
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(positions_T=torch.tensor(positions, dtype=torch.int64, device=device),
                   seg_indptr_B1=torch.tensor(seg, **i32),
                   kv_lens_B=torch.tensor([n + p for n, p in zip(new_lens, prefix_lens)], **i32),
                   block_tables_BM=table.to(device),
                   slot_mapping_T=torch.tensor(slots, dtype=torch.int64, device=device),
                   decode_only=max(new_lens) == 1)


class PagedKVCache:
    """Per-layer key and value pages ``[P, S, N, D]`` of one rank (its kv heads).

    The pages are allocated once and never move: captured CUDA graphs hold their addresses,
    and a page freed by one sequence is simply overwritten by the next owner (a sequence never
    reads past its own length, so stale values are never seen).
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a KV cache needs at least one page of at least one token; got "
                             f"{num_pages} pages of {page_size}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_pages, self.page_size = num_pages, page_size

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
        """Bytes of one page over every layer (keys and values) on one rank."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
