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

from typing import NamedTuple

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
