"""The byte-row format of the fixed-capacity all-to-all, and where each destination's rows go.

Legend: T tokens, H hidden, K top-k, P EP degree, C capacity (rows per destination), W int32
meta words per row. No torch kernels, no triton: the references, the kernels' host glue and the
dispatcher read the same numbers from here.

A token travels as one byte row, so one ``all_to_all_single`` moves everything it needs::

    word  0 .. K-1   fp32 top-k weights (bits)
    word  K .. 2K-1  int32 expert ids, local to the destination (-1: not one of its experts)
    word  2K         int32 adapter slot (-1: base model only)
    word  2K+1       int32 header: rows this source sends to this destination (its count, which
                     may exceed C), plus HEADER_OVERFLOW_BIT when the source overflowed the
                     capacity towards any destination
    words 2K+2 .. W-1  zero
    bytes 4W ..      x (H elements of its dtype), then zeros up to the row's end

``4W`` and the row stride are multiples of 16 bytes, so every part is a view in place (the
layout is that of :func:`moelora_dist.moe.dispatch.packing.row_layout`, whose first pad word now
carries the header: ``4 (2K + 1)`` is never a multiple of 16, so that word always exists).
Every byte of every row is written, padding rows included: nothing uninitialized goes on the
wire.

Placement of the main exchange (``C`` rows per destination, one buffer ``buf``):

- ``bypass=True`` (default): ``buf = [recv: P blocks | send: P - 1 blocks]``. The rows for this
  rank itself are written straight into receive block 0 and never go through the collective;
  the rows for destination ``d != me`` go to send block ``d - (d > me)``. The collective's
  splits are ``C`` for every peer and ``0`` for itself (static, known on the host), and source
  ``s != me`` lands in receive block ``1 + s - (s > me)``.
- ``bypass=False``: ``buf = [recv: P blocks | send: P blocks]``, destination ``d`` in send block
  ``d``, source ``s`` in receive block ``s``: even splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

import torch

HEADER_OVERFLOW_BIT = 1 << 30
HEADER_COUNT_MASK = HEADER_OVERFLOW_BIT - 1
MAX_TOKENS = HEADER_COUNT_MASK  # a count must fit below the flag bit


@dataclass(frozen=True)
class RowFormat:
    """Offsets of one byte row for tokens of ``hidden`` elements of ``dtype`` and ``top_k``."""

    hidden: int
    top_k: int
    dtype: torch.dtype

    # Cached: the dispatcher reads these on every call (host time counts).
    @cached_property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @cached_property
    def x_offset(self) -> int:
        """Byte offset of x in a row (a multiple of 16)."""
        return -(-(4 * (2 * self.top_k + 1)) // 16) * 16

    @cached_property
    def meta_words(self) -> int:
        """W: int32 words before x, padding included."""
        return self.x_offset // 4

    @property
    def header_word(self) -> int:
        return 2 * self.top_k + 1

    @cached_property
    def row_bytes(self) -> int:
        xb = self.hidden * self.itemsize
        return self.x_offset + -(-xb // 16) * 16

    @cached_property
    def x_columns(self) -> int:
        """Elements of ``dtype`` from x's start to the row's end (x, then zero padding)."""
        return (self.row_bytes - self.x_offset) // self.itemsize

    def words(self, buf_RB: torch.Tensor) -> torch.Tensor:
        """``[R, row_bytes / 4]`` int32 view of byte rows ``buf_RB [R, row_bytes]`` uint8."""
        return buf_RB.view(torch.int32)

    def x_view(self, buf_RB: torch.Tensor) -> torch.Tensor:
        """``[R, H]`` view of the x part of byte rows (row stride ``row_bytes / itemsize``)."""
        start = self.x_offset // self.itemsize
        return buf_RB.view(self.dtype)[:, start:start + self.hidden]

    def headers(self, buf_RB: torch.Tensor) -> torch.Tensor:
        """``[R]`` int32 header words of byte rows (a strided view)."""
        return self.words(buf_RB)[:, self.header_word]


@lru_cache(maxsize=64)
def row_format(hidden: int, top_k: int, dtype: torch.dtype) -> RowFormat:
    """The (cached) :class:`RowFormat` of a shape."""
    return RowFormat(hidden, top_k, dtype)


def send_blocks(num_dest: int, bypass: bool) -> int:
    """Blocks of the send part of the main buffer (the receive part has ``num_dest``)."""
    if num_dest == 1:
        return 0
    return num_dest - 1 if bypass else num_dest


def dest_block(d: int, me: int, num_dest: int, bypass: bool) -> int:
    """Block of the main buffer (receive blocks first) that destination ``d``'s rows go to."""
    if num_dest == 1 or (bypass and d == me):
        return 0
    return num_dest + (d - (d > me) if bypass else d)


def source_of_recv_block(b: int, me: int, bypass: bool) -> int:
    """The EP rank whose rows arrive in receive block ``b``."""
    if not bypass:
        return b
    if b == 0:
        return me
    return b - 1 if b - 1 < me else b


def back_block(d: int, me: int, bypass: bool) -> int | None:
    """Block of the combine's return buffer holding destination ``d``'s results (None: with
    ``bypass`` this rank's own results, read from the experts' output block 0)."""
    if bypass:
        return None if d == me else d - (d > me)
    return d


def exchange_splits(capacity: int, me: int, num_dest: int, bypass: bool) -> list[int]:
    """Rows per peer of the main exchange (the same list sends and receives)."""
    return [0 if (bypass and d == me) else capacity for d in range(num_dest)]


class DispatchIndex(NamedTuple):
    """Where the tokens of one share go (output of ``dispatch_index``).

    ``pos_nP [n, P]`` int32: row of token ``i`` among destination ``d``'s rows (in token order;
    ``>= C`` for an overflow row), ``-1`` when ``d`` owns none of its experts.
    ``inv_PC [P, C]`` int32: the token of each of destination ``d``'s first ``C`` rows, ``-1``
    for padding. ``overflow_inv_PO [P, O]`` int32: the token of overflow row ``j`` (rows
    ``C + j``), ``O = max(share - C, 0)`` (the worst case). ``counts_P [P]`` int32: tokens
    each destination needs (may exceed ``C``).
    """

    pos_nP: torch.Tensor
    inv_PC: torch.Tensor
    overflow_inv_PO: torch.Tensor
    counts_P: torch.Tensor
