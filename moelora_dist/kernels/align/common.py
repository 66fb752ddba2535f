"""Triton-free pieces of the align family shared by the kernel glue and the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    """Items sorted into blocks of ``block_m`` rows that share one bucket.

    ``sorted_ids``: ``[max_rows]`` int32 item ids; padding rows hold ``num_items`` (never a
    valid item, never negative). ``block_bucket``: ``[max_blocks]`` int32 bucket of each
    block, ``-1`` for sentinel blocks and blocks past the end. ``num_post_pad``: ``[1]``
    int32 rows in use (sentinel blocks included, they sit last).
    """

    sorted_ids: torch.Tensor
    block_bucket: torch.Tensor
    num_post_pad: torch.Tensor
    block_m: int
    num_items: int

    @property
    def max_blocks(self) -> int:
        return int(self.block_bucket.numel())


def max_rows(num_items: int, num_buckets: int, block_m: int) -> int:
    """Worst-case padded length for ``num_items`` items over ``num_buckets`` + sentinel."""
    nonempty = min(num_buckets + 1, num_items)
    return -(-(num_items + nonempty * (block_m - 1)) // block_m) * block_m
