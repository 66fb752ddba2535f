"""Cut the rank-local part of a canonical adapter (docs/design.md section 2).

Legend: E experts (E_l local), H hidden, I expert intermediate (I_l local), r rank.

MoE layers follow the MoE split of the TP group, ``ep x moe_tp``:

    factor               experts (EP)            I (MoE-TP)
    gate.a, up.a [Ea,r,H]  [expert_start, end)     whole (input side is H)
    gate.b, up.b [Eb,I,r]  [expert_start, end)     rows [i_start, i_end)
    down.a       [Ea,r,I]  [expert_start, end)     columns [i_start, i_end)
    down.b       [Eb,H,r]  [expert_start, end)     whole (output side is H)

A factor with an expert dim of 1 is one copy shared by every expert (shared-outer); it is
replicated on every EP rank, so it is never cut over experts (its I dim, if any, still is).
The shard comes from :meth:`RankLayout.moe_shard`, i.e. from ``moe_tp_rank`` of ``moe_tp`` —
slicing by ``tp_rank`` of ``tp`` is wrong whenever ``ep > 1``.

Dense (non-MoE) modules follow the ordinary TP rule over the whole TP group (``tp_rank`` of
``tp``): a column-parallel module splits the rows of ``B`` (its output), a row-parallel one the
columns of ``A`` (its input), a replicated one is whole on every rank.

Slices are views of the input tensors; the pool copies them into its buffers.
"""

from __future__ import annotations

import torch

from moelora_dist.adapters.canonical import LoRAFactors, MoELayerLoRA
from moelora_dist.parallel.layout import MoEShard, RankLayout

DENSE_SPLITS = ("column", "row", "replicated")


def _experts(t: torch.Tensor, shard: MoEShard, what: str) -> torch.Tensor:
    """Keep this EP rank's experts of ``t: [Ex, ...]``; ``Ex == 1`` (shared) stays whole."""
    if t.dim() != 3:
        raise ValueError(f"{what} must be 3-D [experts, rows, cols], got shape {list(t.shape)}")
    if t.shape[0] == 1:
        return t
    if t.shape[0] != shard.num_experts:
        raise ValueError(
            f"{what} has expert dim {t.shape[0]}, expected {shard.num_experts} (one per "
            f"expert) or 1 (shared by all experts)"
        )
    return t[shard.expert_start:shard.expert_end]


def _check_i(size: int, shard: MoEShard, what: str) -> None:
    if size != shard.intermediate:
        raise ValueError(
            f"{what} has an intermediate dim of {size}, but the layer's intermediate size is "
            f"{shard.intermediate}; the adapter does not belong to this model"
        )
    if not 0 <= shard.i_start < shard.i_end <= shard.intermediate:
        raise ValueError(f"shard rows [{shard.i_start}, {shard.i_end}) lie outside I={size}")


def slice_moe_layer(layer: MoELayerLoRA, shard: MoEShard) -> MoELayerLoRA:
    """Rank-local part of one MoE layer's LoRA.

    Args:
        layer: full factors (``gate.a/up.a: [Ea, r, H]``, ``gate.b/up.b: [Eb, I, r]``,
            ``down.a: [Ea, r, I]``, ``down.b: [Eb, H, r]``; ``Ea``/``Eb`` is E or 1).
        shard: this rank's experts and I rows, from ``RankLayout.moe_shard(E, I)``.
    Returns:
        A :class:`MoELayerLoRA` with ``num_experts = E_l``: per-expert factors cut to
        ``[E_l, ...]``, expert dims of 1 kept; ``gate.b/up.b: [., I_l, r]``,
        ``down.a: [., r, I_l]``; ``gate.a``, ``up.a``, ``down.b`` whole in H. Same dtype,
        views of the input. When ``gate.a is up.a`` on input, it still is on output.
    Raises:
        ValueError: expert count or intermediate size does not match the shard.
    """
    if layer.num_experts != shard.num_experts:
        raise ValueError(
            f"adapter layer has {layer.num_experts} experts but the shard is of a layer with "
            f"{shard.num_experts}; the adapter does not belong to this model"
        )
    i0, i1 = shard.i_start, shard.i_end
    out = MoELayerLoRA(num_experts=shard.num_local_experts)
    shared_a = None
    for name in ("gate", "up"):
        f = getattr(layer, name)
        if f is None:
            continue
        _check_i(int(f.b.shape[1]), shard, f"{name}.b")
        if name == "up" and layer.gate_up_shared_a:
            a = shared_a  # keep the identity gate.a is up.a
        else:
            a = _experts(f.a, shard, f"{name}.a")
        shared_a = a
        b = _experts(f.b, shard, f"{name}.b")[:, i0:i1, :]
        setattr(out, name, LoRAFactors(a=a, b=b, scaling=f.scaling))
    if layer.down is not None:
        f = layer.down
        _check_i(int(f.a.shape[2]), shard, "down.a")
        a = _experts(f.a, shard, "down.a")[:, :, i0:i1]
        b = _experts(f.b, shard, "down.b")
        out.down = LoRAFactors(a=a, b=b, scaling=f.scaling)
    return out


def _split(size: int, rank_layout: RankLayout, what: str) -> tuple[int, int]:
    tp, tp_rank = rank_layout.layout.tp, rank_layout.tp_rank
    if size % tp:
        raise ValueError(
            f"{what}={size} is not divisible by tp={tp}; pick a tp that divides {size} or "
            f"declare the module replicated"
        )
    step = size // tp
    return tp_rank * step, (tp_rank + 1) * step


def slice_dense(factors: LoRAFactors, rank_layout: RankLayout, split: str) -> LoRAFactors:
    """Rank-local part of a dense module's LoRA under ordinary TP (``tp_rank`` of ``tp``).

    Args:
        factors: ``a: [1, r, in]``, ``b: [1, out, r]`` (full dims).
        rank_layout: this rank's view of the layout.
        split: ``"column"`` (output split: ``b`` rows), ``"row"`` (input split: ``a``
            columns) or ``"replicated"`` (whole).
    Returns:
        :class:`LoRAFactors` with ``b: [1, out/tp, r]`` (column) or ``a: [1, r, in/tp]``
        (row); same dtype and scaling, views of the input.
    Raises:
        ValueError: unknown split, or the split dim does not divide by ``tp``.
    """
    if split not in DENSE_SPLITS:
        raise ValueError(f"unknown dense split {split!r}; use one of {DENSE_SPLITS}")
    a, b = factors.a, factors.b
    if split == "column":
        lo, hi = _split(int(b.shape[1]), rank_layout, "out_dim (rows of B)")
        b = b[:, lo:hi, :]
    elif split == "row":
        lo, hi = _split(int(a.shape[2]), rank_layout, "in_dim (columns of A)")
        a = a[:, :, lo:hi]
    return LoRAFactors(a=a, b=b, scaling=factors.scaling)
