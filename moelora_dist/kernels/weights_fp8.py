"""Block-FP8 weights as the kernels read them: a small tuple beside :class:`MoELoRAWeights`.

Legend: N output rows, K input columns, Nb = ceil(N / block_n), Kb = ceil(K / 128),
E_l local experts.

    weight:    [N, K] or [E_l, N, K]  float8_e4m3fn
    scale_inv: [Nb, Kb] or [E_l, Nb, Kb]  float32
    block_n:   rows that share one scale row (128 as stored; a divisor of 128 after a rank's
               rows were cut out of a checkpoint at a non-block boundary, see
               ``moelora_dist.models.fp8_weights.reblock_rows``)

Value of an element: ``weight[..., n, k] * scale_inv[..., n // block_n, k // 128]``. Columns
are always in blocks of :data:`~moelora_dist.kernels.constants.FP8_GROUP` (128), the same
groups in which the kernels quantize activations, so a rank's columns must start on a block.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from moelora_dist.kernels.constants import FP8_GROUP


class BlockFP8Weight(NamedTuple):
    weight: torch.Tensor  # [..., N, K] float8_e4m3fn
    scale_inv: torch.Tensor  # [..., Nb, Kb] float32
    block_n: int = FP8_GROUP

    @property
    def shape(self) -> torch.Size:
        """The weight's logical shape (what a bf16 twin would have)."""
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to_device(self, device) -> "BlockFP8Weight":
        return BlockFP8Weight(self.weight.to(device), self.scale_inv.to(device), self.block_n)

    def nbytes(self) -> int:
        return (self.weight.numel() * self.weight.element_size()
                + self.scale_inv.numel() * self.scale_inv.element_size())

    def row_view(self, start: int, end: int) -> "BlockFP8Weight":
        """Rows ``[start, end)`` as views of this weight's values and scales (``start`` on a
        scale block: a multiple of ``block_n``)."""
        if start % self.block_n:
            raise ValueError(f"row {start} does not start a block of {self.block_n} rows")
        bn = self.block_n
        return BlockFP8Weight(self.weight[..., start:end, :],
                              self.scale_inv[..., start // bn:-(-end // bn), :], bn)

    def check(self) -> None:
        """Internal invariants of the tuple (loaders build it; a wrong one is a bug)."""
        w, s = self.weight, self.scale_inv
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, (w.dtype, s.dtype)
        assert FP8_GROUP % self.block_n == 0, self.block_n
        N, K = w.shape[-2:]
        want = (-(-N // self.block_n), -(-K // FP8_GROUP))
        assert tuple(s.shape[-2:]) == want and s.shape[:-2] == w.shape[:-2], (s.shape, want)


def is_fp8(w) -> bool:
    return isinstance(w, BlockFP8Weight)


def can_cat_rows(ws: Sequence[BlockFP8Weight]) -> bool:
    """Whether :func:`cat_rows` takes ``ws``: one scale block size, the same leading dims and
    columns, and every part but the last made of whole blocks (so the stored scales serve the
    concatenation as they are: no scale is added or re-blocked)."""
    if not ws:
        return False
    w0 = ws[0]
    lead, K = w0.weight.shape[:-2], w0.weight.shape[-1]
    return (all(w.block_n == w0.block_n and w.weight.shape[:-2] == lead
                and w.weight.shape[-1] == K for w in ws)
            and all(w.weight.shape[-2] % w.block_n == 0 for w in ws[:-1]))


def cat_rows(ws: Sequence[BlockFP8Weight]) -> BlockFP8Weight:
    """The weights' rows concatenated, values and scales, as one GEMM computes them (q, k and
    v; gate and up); ``ws`` as :func:`can_cat_rows` accepts. Part ``i`` is then
    ``row_view(start_i, start_i + rows_i)`` of the result."""
    if not can_cat_rows(ws):
        raise ValueError("cat_rows needs weights of one scale block size, leading dims and "
                         "column count, all but the last of whole blocks; got "
                         f"{[(tuple(w.weight.shape), w.block_n) for w in ws]}")
    out = BlockFP8Weight(torch.cat([w.weight for w in ws], dim=-2).contiguous(),
                         torch.cat([w.scale_inv for w in ws], dim=-2).contiguous(),
                         ws[0].block_n)
    out.check()
    return out
