"""Validate an adapter against a pool, cut its rank-local part, and write one slot.

Loading is two phases so that a bad adapter never touches a buffer:

1. :func:`stage_adapter` checks everything (layers and modules exist, expert counts, every
   shape, rank <= R, rank > 0, shared-outer vs the pool's mode, values the pool's dtype can
   store) and slices the factors to this rank. It only reads; any problem raises
   :class:`PoolError`. The values are scanned once per adapter
   (:func:`moelora_dist.adapters.validate.check_values`, done by the loader; an adapter built
   in memory is checked on its first load), never again on a reload.
2. :func:`write_moe_slot` / :func:`write_dense_slot` zero the whole slot of one buffer and
   copy the staged slice in, folding each projection's scaling into its B.

Legend: S slots, R max rank, E_l local experts, H hidden, I_l local intermediate, r rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelora_dist.adapters import AdapterError
from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.adapters.validate import check_values
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.lora import slicing
from moelora_dist.lora.pool_types import DenseLoRABuffers, DenseModuleSpec, MoELayerSpec, PoolError
from moelora_dist.parallel.layout import MoEShard, RankLayout


@dataclass
class StagedAdapter:
    """An adapter validated against a pool and cut to one rank; nothing written yet."""

    name: str
    moe: dict[int, MoELayerLoRA] = field(default_factory=dict)  # rank-local
    dense: dict[str, LoRAFactors] = field(default_factory=dict)  # rank-local
    max_rank: int = 0


def _check_factors(f: LoRAFactors, where: str, in_dim: int, out_dim: int, num_experts: int,
                   max_rank: int) -> None:
    """Shapes, ranks and dtypes of one factor pair against the pool's spec."""
    a, b = f.a, f.b
    if a.dim() != 3 or b.dim() != 3:
        raise PoolError(f"{where}: factors must be 3-D (a [Ea, r, in], b [Eb, out, r]), got a "
                        f"{list(a.shape)} and b {list(b.shape)}")
    r = int(a.shape[1])
    expected_a = f"[{num_experts} or 1, r, {in_dim}]"
    expected_b = f"[{num_experts} or 1, {out_dim}, r]"
    if a.shape[0] not in (1, num_experts) or a.shape[2] != in_dim:
        raise PoolError(f"{where}: lora A has shape {list(a.shape)}, expected {expected_a}")
    if b.shape[0] not in (1, num_experts) or b.shape[1] != out_dim:
        raise PoolError(f"{where}: lora B has shape {list(b.shape)}, expected {expected_b}")
    if b.shape[2] != r:
        raise PoolError(f"{where}: A has rank {r} but B has rank {b.shape[2]}")
    if r <= 0:
        raise PoolError(f"{where}: rank 0 factors; drop the module from the adapter instead")
    if r > max_rank:
        raise PoolError(f"{where}: rank {r} exceeds the pool's max_rank={max_rank}; build the "
                        f"pool with max_rank >= {r}")
    for key, t in (("A", a), ("B", b)):
        if not t.dtype.is_floating_point:
            raise PoolError(f"{where}: lora {key} has dtype {t.dtype}, expected a float dtype")


def _check_storable(f: LoRAFactors, where: str, dtype: torch.dtype) -> None:
    """Whether the pool's dtype holds the (checked) values: a finite fp32 value past fp16's
    range would be stored as Inf. Uses the statistics of the one value check (made on the
    full tensors, so every rank of a TP group reaches the same verdict); no tensor scan."""
    top = torch.finfo(dtype).max
    stored = {"A": f.max_abs_a, "B (scaling folded in)": abs(f.scaling) * f.max_abs_b}
    for key, value in stored.items():
        if not value <= top:
            raise PoolError(f"{where}: lora {key} reaches {value:.3g}, past the largest "
                            f"{dtype} ({top:.3g}) the pool stores; use a float32 or bfloat16 "
                            "pool (--dtype) or fix the adapter")


def _check_moe_layer(name: str, idx: int, layer: MoELayerLoRA, spec: MoELayerSpec,
                     max_rank: int, outer_shared_only: bool) -> None:
    where = f"adapter {name!r} MoE layer {idx}"
    if layer.num_experts != spec.num_experts:
        raise PoolError(f"{where}: {layer.num_experts} experts, but the model layer has "
                        f"{spec.num_experts}")
    H, I, E = spec.hidden, spec.intermediate, spec.num_experts
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    for proj, f in layer.projections().items():
        _check_factors(f, f"{where} {proj}", *dims[proj], E, max_rank)
        outer = f.b if proj == "down" else f.a
        if outer_shared_only and outer.shape[0] != 1:
            raise PoolError(
                f"{where} {proj}: {'B' if proj == 'down' else 'A'} is per-expert "
                f"{list(outer.shape)}, but this pool is outer_shared_only (one copy per layer); "
                f"build the pool with outer_shared_only=False to serve per-expert adapters"
            )


def stage_adapter(adapter: CanonicalAdapter, rank_layout: RankLayout, max_rank: int,
                  outer_shared_only: bool, moe_specs: dict[int, MoELayerSpec],
                  shards: dict[int, MoEShard], dense_specs: dict[str, DenseModuleSpec],
                  dtype: torch.dtype) -> StagedAdapter:
    """Validate ``adapter`` against the pool and slice it to this rank; raises PoolError.

    Order: every shape against the pool's specs, then the values (once per adapter), then
    whether the pool's dtype stores them; nothing is sliced before all of it passed.
    """
    if not isinstance(adapter, CanonicalAdapter):
        raise PoolError(f"expected a CanonicalAdapter, got {type(adapter).__name__}")
    for idx, layer in sorted(adapter.moe.items()):
        if idx not in moe_specs:
            raise PoolError(f"adapter {adapter.name!r} targets MoE layer {idx}, but the pool "
                            f"has MoE layers {sorted(moe_specs)}; is it for another model?")
        _check_moe_layer(adapter.name, idx, layer, moe_specs[idx], max_rank, outer_shared_only)
    for path, f in sorted(adapter.dense.items()):
        if path not in dense_specs:
            raise PoolError(f"adapter {adapter.name!r} targets dense module {path!r}, which "
                            f"the pool does not serve; known: {sorted(dense_specs)}")
        spec = dense_specs[path]
        _check_factors(f, f"adapter {adapter.name!r} module {path!r}", spec.in_dim,
                       spec.out_dim, 1, max_rank)
    if not adapter.values_checked:
        try:
            check_values(adapter, f"adapter {adapter.name!r}")
        except AdapterError as exc:
            raise PoolError(str(exc)) from None
    for where, _, f in adapter.factors():
        _check_storable(f, f"adapter {adapter.name!r} {where}", dtype)
    staged = StagedAdapter(adapter.name)
    for idx, layer in sorted(adapter.moe.items()):
        try:
            staged.moe[idx] = slicing.slice_moe_layer(layer, shards[idx])
        except ValueError as exc:
            raise PoolError(f"adapter {adapter.name!r} MoE layer {idx}: {exc}") from exc
        staged.max_rank = max(staged.max_rank, layer.max_rank)
    for path, f in sorted(adapter.dense.items()):
        spec = dense_specs[path]
        try:
            staged.dense[path] = slicing.slice_dense(f, rank_layout, spec.split)
        except ValueError as exc:
            raise PoolError(f"adapter {adapter.name!r} module {path!r}: {exc}") from exc
        staged.max_rank = max(staged.max_rank, f.rank)
    return staged


def _scaled(b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``scaling * b`` computed in at least fp32 (fp64 if either side is), then cast."""
    acc = torch.float64 if torch.float64 in (b.dtype, dtype) else torch.float32
    return (b.to(acc) * scaling).to(dtype)


def clear_moe_slot(buf: MoELoRAWeights, slot: int, outer_shared_only: bool) -> None:
    """Return slot ``slot`` of one layer's buffers to the state of a fresh pool."""
    for t in (buf.gate_up_a, buf.gate_up_b, buf.down_a, buf.down_b):
        t[slot].zero_()
    buf.gate_up_a_shared[slot] = outer_shared_only
    buf.down_b_shared[slot] = outer_shared_only
    buf.slot_rank[slot] = 0


def write_moe_slot(buf: MoELoRAWeights, slot: int, local: MoELayerLoRA | None,
                   outer_shared_only: bool) -> None:
    """Zero slot ``slot`` of one layer, then write ``local`` (rank-local, validated) into it.

    A shared-outer A (B) is stored once at expert index 0 with the slot's shared flag set,
    when every targeted A of gate/up (the down B) is shared; if gate's A is shared and up's
    is not, the shared one is copied into every local expert instead (load-time copy).
    """
    clear_moe_slot(buf, slot, outer_shared_only)
    if local is None:
        return
    R, I_l, dt = buf.max_rank, buf.i_local, buf.gate_up_a.dtype
    gate_up = [f for f in (local.gate, local.up) if f is not None]
    a_shared = outer_shared_only or (bool(gate_up) and all(f.a_shared for f in gate_up))
    b_shared = outer_shared_only or (local.down is not None and local.down.b_shared)
    buf.gate_up_a_shared[slot] = a_shared
    buf.down_b_shared[slot] = b_shared
    for f, row0 in ((local.gate, 0), (local.up, 1)):
        if f is None:
            continue
        r = f.rank
        a_dst = buf.gate_up_a[slot, :1] if a_shared else buf.gate_up_a[slot]
        a_dst[:, row0 * R:row0 * R + r].copy_(f.a.to(dt))  # [Ea|1, r, H] broadcasts
        buf.gate_up_b[slot, :, row0 * I_l:(row0 + 1) * I_l, :r].copy_(
            _scaled(f.b, f.scaling, dt))
    if local.down is not None:
        f = local.down
        r = f.rank
        buf.down_a[slot, :, :r].copy_(f.a.to(dt))
        b_dst = buf.down_b[slot, :1] if b_shared else buf.down_b[slot]
        b_dst[:, :, :r].copy_(_scaled(f.b, f.scaling, dt))
    buf.slot_rank[slot] = local.max_rank


def clear_dense_slot(buf: DenseLoRABuffers, slot: int) -> None:
    buf.a[slot].zero_()
    buf.b[slot].zero_()
    buf.slot_rank[slot] = 0


def write_dense_slot(buf: DenseLoRABuffers, slot: int, local: LoRAFactors | None) -> None:
    """Zero slot ``slot`` of one dense module, then write ``local`` (``a: [1, r, in_local]``,
    ``b: [1, out_local, r]``) with its scaling folded into B."""
    clear_dense_slot(buf, slot)
    if local is None:
        return
    r = local.rank
    buf.a[slot, :r].copy_(local.a[0].to(buf.a.dtype))
    buf.b[slot, :, :r].copy_(_scaled(local.b[0], local.scaling, buf.b.dtype))
    buf.slot_rank[slot] = r
