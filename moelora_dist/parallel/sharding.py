"""Cutting a rank's part out of full expert tensors (the one gate/up row slicer).

Legend: E experts, I intermediate, I_l = I / moe_tp local intermediate.
"""

from __future__ import annotations

import torch

from moelora_dist.parallel.layout import MoEShard


def cut_gate_up(t: torch.Tensor, shard: MoEShard, dim: int) -> torch.Tensor:
    """The rank's ``2 I_l`` rows of a fused gate_up dim ``dim`` of size ``2I`` (gate rows
    first): its ``I`` range of the gate half, then the same range of the up half."""
    if t.shape[dim] != 2 * shard.intermediate:
        raise ValueError(f"gate_up dim {dim} has {t.shape[dim]} rows, expected 2*I = "
                         f"{2 * shard.intermediate}")
    gate, up = shard.gate_up_slices
    index = [slice(None)] * t.dim()
    index[dim] = gate
    g = t[tuple(index)]
    index[dim] = up
    return torch.cat([g, t[tuple(index)]], dim=dim)
