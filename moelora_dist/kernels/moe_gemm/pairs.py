"""The pair outputs of a MoE call before their top-k sum (no Triton import: the model names
the type on machines without Triton)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PairOutputs(NamedTuple):
    """The weighted pair outputs of a MoE call before their sum over top-k (``[T*K, H]``;
    rows of invalid experts never written): what a consumer that sums them itself takes (the
    residual add + norm after a one-GPU MoE layer, ``norm.ops.add_topk_rms_norm``), or
    :meth:`sum` (``moe_gemm.ops.topk_sum``)."""

    out_NH: torch.Tensor
    topk_ids_TK: torch.Tensor
    num_experts: int
    plus_TH: torch.Tensor | None = None  # added to the sum (a layer's shared experts)

    def sum(self) -> torch.Tensor:
        """``topk_sum`` (+ ``plus_TH``, one rounding of its own, as ``y + shared``)."""
        from moelora_dist.kernels.moe_gemm.ops import topk_sum  # Triton: optional off x86

        y = topk_sum(self.out_NH, self.topk_ids_TK, self.num_experts)
        return y if self.plus_TH is None else y + self.plus_TH
