"""One rank's slice of a gpt-oss MoE layer: experts stored ``[E, H, 2I]`` (used as ``x @ W``)
with gate/up columns interleaved, biases, a router with a bias; bf16 or MXFP4.

Legend: E experts, E_l local experts, H hidden, I intermediate, I_l local intermediate.

Keys under ``model.layers.{l}.mlp``::

    router.weight [E, H], router.bias [E]
    experts.gate_up_proj [E, H, 2I]  experts.gate_up_proj_bias [E, 2I]   (gate at 2i, up 2i+1)
    experts.down_proj    [E, I, H]   experts.down_proj_bias    [E, H]
    or, MXFP4: experts.{gate_up,down}_proj_{blocks,scales} ([E, out, in/32, 16], [E, out, in/32])

A rank's ``I`` range ``[i0, i1)`` is the contiguous interleaved column run ``[2 i0, 2 i1)``;
it is read, transposed to ``[E_l, 2 I_l, H]`` and de-interleaved once here (gate rows, then
up rows: what the kernels read). Adapters follow the same permutation
(:mod:`moelora_dist.adapters.peft_params`).
"""

from __future__ import annotations

import torch

from moelora_dist.models.mxfp4 import read_mxfp4
from moelora_dist.parallel.layout import MoEShard
from moelora_dist.parallel.sharding import deinterleave_gate_up


def is_mxfp4(reader, prefix: str) -> bool:
    return reader.has(f"{prefix}.experts.gate_up_proj_blocks")


def load_oss_experts(reader, prefix: str, shard: MoEShard, *, hidden: int,
                     dtype: torch.dtype | None):
    """``(w_gate_up [E_l, 2I_l, H], w_down [E_l, H, I_l], b_gate_up [E_l, 2I_l],
    b_down [E_l, H], num_mxfp4_values)`` of this rank, read sliced (MXFP4 dequantized to
    ``dtype``; ``num_mxfp4_values`` is 0 for a bf16 checkpoint)."""
    E, I, H = shard.num_experts, shard.intermediate, hidden
    ex, i0, i1 = shard.expert_slice, shard.i_start, shard.i_end
    gu, dn = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    if is_mxfp4(reader, prefix):
        dt = dtype or torch.bfloat16
        gate_up = read_mxfp4(reader, gu, ex, slice(2 * i0, 2 * i1), (0, H), (E, 2 * I, H), dt)
        down = read_mxfp4(reader, dn, ex, slice(None), (i0, i1), (E, H, I), dt)
        quantized = gate_up.numel() + down.numel()
    else:
        gate_up = reader.get(gu, ex, slice(None), slice(2 * i0, 2 * i1),
                             expect_shape=(E, H, 2 * I)).transpose(1, 2)
        down = reader.get(dn, ex, slice(i0, i1), expect_shape=(E, I, H)).transpose(1, 2)
        quantized = 0
    b_gate_up = reader.get(f"{gu}_bias", ex, slice(2 * i0, 2 * i1), expect_shape=(E, 2 * I))
    b_down = reader.get(f"{dn}_bias", ex, expect_shape=(E, H))
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)  # noqa: E731
    return (cast(deinterleave_gate_up(gate_up, 1)).contiguous(), cast(down).contiguous(),
            cast(deinterleave_gate_up(b_gate_up, 1)).contiguous(), cast(b_down).contiguous(),
            quantized)
