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


def deinterleave_gate_up(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss's interleaved gate/up dim (gate at even, up at odd positions) -> gate half
    then up half, the layout every kernel reads. Applied once at load to the expert weights,
    their biases and the rows of an adapter's gate_up ``lora_B``."""
    if t.shape[dim] % 2:
        raise ValueError(f"an interleaved gate_up dim needs an even size, got {t.shape[dim]}")
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    gate = t[tuple(index)]
    index[dim] = slice(1, None, 2)
    return torch.cat([gate, t[tuple(index)]], dim=dim)
