"""The LoRA slot pool: ``S`` adapter slots of rank ``R`` on one rank, LRU, pinning.

Legend: S slots, R max rank, B requests. Per MoE layer the pool holds one
:class:`~moelora_dist.kernels.weights.MoELoRAWeights` (rank-local buffers, the tensors the
MoE kernels read; docs/design.md), per dense module one :class:`DenseLoRABuffers`. Writing a slot (:mod:`.pool_write`) validates the
whole adapter first, then zeroes the whole slot in every buffer and writes the rank-local
slice, so a smaller rank or an untargeted module never inherits the previous tenant's values,
and a bad adapter leaves every buffer byte-identical.

Usage by a serving loop, once per batch::

    req_to_slot_B = pool.prepare_batch(["a", None, "b"], registry)  # loads + pins
    info = build_batch_info(seg_indptr_B1, req_to_slot_B, pool.slot_rank_S)
    ... forward, each MoE layer reads pool.moe_buffers(layer) ...
    pool.release_batch()                                             # unpins

Eviction is least-recently-used among unpinned slots; a slot is "used" when loaded and each
time a batch asks for it. Pins accumulate over ``prepare_batch`` calls (an engine may overlap
two batches) until ``release_batch`` clears them all.
"""

from __future__ import annotations

import logging

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter
from moelora_dist.kernels.device import to_device
from moelora_dist.kernels.weights import MoELoRAWeights
from moelora_dist.lora.pool_report import describe_pool
from moelora_dist.lora.pool_types import (DenseLoRABuffers, DenseModuleSpec, MoELayerSpec,
                                          PoolConfig, PoolError)
from moelora_dist.lora.pool_write import (clear_dense_slot, clear_moe_slot, stage_adapter,
                                          write_dense_slot, write_moe_slot)
from moelora_dist.parallel.layout import LayoutError, MoEShard, RankLayout

__all__ = ["DenseLoRABuffers", "DenseModuleSpec", "LoRAPool", "MoELayerSpec", "PoolConfig",
           "PoolError"]

log = logging.getLogger(__name__)


class LoRAPool:
    """``config.max_loras`` slots of rank-local LoRA weights for the given layers and modules.

    Args:
        config: slots, max rank, dtype, device, outer-shared mode.
        rank_layout: this rank's view of the layout (mocked ranks work: no process group).
        moe_layers: MoE layer index -> full shape; layers without MoE are simply absent.
        dense_modules: module path -> full dims and TP split.
    """

    def __init__(self, config: PoolConfig, rank_layout: RankLayout,
                 moe_layers: dict[int, MoELayerSpec],
                 dense_modules: dict[str, DenseModuleSpec] | None = None) -> None:
        self.config = config
        self.rank_layout = rank_layout
        self.moe_specs = dict(moe_layers)
        self.dense_specs = dict(dense_modules or {})
        S, R = config.max_loras, config.max_rank
        kw = dict(dtype=config.dtype, device=config.device)
        self._shards: dict[int, MoEShard] = {}
        self._moe: dict[int, MoELoRAWeights] = {}
        for idx, spec in sorted(self.moe_specs.items()):
            try:
                shard = rank_layout.moe_shard(spec.num_experts, spec.intermediate)
            except LayoutError as exc:
                raise PoolError(f"MoE layer {idx}: {exc}") from exc
            self._shards[idx] = shard
            self._moe[idx] = MoELoRAWeights.zeros(
                S, shard.num_local_experts, R, spec.hidden, shard.i_local,
                outer_shared_only=config.outer_shared_only, **kw)
        self._dense: dict[str, DenseLoRABuffers] = {}
        for path, spec in sorted(self.dense_specs.items()):
            in_l, out_l = spec.local_dims(rank_layout.layout.tp)
            self._dense[path] = DenseLoRABuffers.zeros(S, R, in_l, out_l, **kw)
        self._slot_rank_S = torch.zeros(S, dtype=torch.int32, device=config.device)
        self._names: list[str | None] = [None] * S
        self._slot_paths: list[frozenset[str]] = [frozenset()] * S  # dense paths per slot
        self._slot_by_name: dict[str, int] = {}
        self._last_use = [0] * S
        self._clock = 0
        self._pinned: set[int] = set()

    # -- slots -------------------------------------------------------------------------------

    def slot_of(self, name: str) -> int | None:
        """Slot of a loaded adapter, or None."""
        return self._slot_by_name.get(name)

    def loaded(self) -> dict[str, int]:
        """Adapter name -> slot, for every occupied slot."""
        return dict(self._slot_by_name)

    @property
    def pinned(self) -> frozenset[int]:
        """Slots pinned by the batches prepared since the last ``release_batch``."""
        return frozenset(self._pinned)

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._last_use[slot] = self._clock

    def _pick_slot(self, name: str) -> int:
        free = [s for s, n in enumerate(self._names) if n is None]
        if free:
            return free[0]
        candidates = [s for s in range(self.config.max_loras) if s not in self._pinned]
        if not candidates:
            raise PoolError(
                f"cannot load adapter {name!r}: all {self.config.max_loras} slots are pinned by "
                f"the running batch ({sorted(self._slot_by_name)}); call release_batch() first "
                f"or build the pool with a larger max_loras"
            )
        return min(candidates, key=lambda s: self._last_use[s])

    def load(self, adapter: CanonicalAdapter, slot: int | None = None) -> int:
        """Load ``adapter`` (full, canonical) into a slot and return the slot.

        Returns the existing slot when an adapter of that name is already loaded (to replace
        one, ``unload`` it first). Validates everything before writing anything; evicts the
        least-recently-used unpinned slot when full. ``slot``: load into exactly this slot
        (evicting its tenant unless pinned): a rank that follows another rank's decisions
        mirrors its slots this way. Raises :class:`PoolError`.
        """
        if isinstance(adapter, CanonicalAdapter) and adapter.name in self._slot_by_name:
            current = self._slot_by_name[adapter.name]
            if slot is None or slot == current:
                self._touch(current)
                return current
            self.unload(adapter.name)
        cfg = self.config
        if slot is not None and not 0 <= slot < cfg.max_loras:
            raise PoolError(f"slot {slot} does not exist; the pool has {cfg.max_loras} slots")
        if slot is not None and slot in self._pinned:
            raise PoolError(f"slot {slot} is pinned by the running batch")
        staged = stage_adapter(adapter, self.rank_layout, cfg.max_rank, cfg.outer_shared_only,
                               self.moe_specs, self._shards, self.dense_specs, cfg.dtype)
        if slot is None:
            slot = self._pick_slot(staged.name)
        old = self._names[slot]
        if old is not None:
            if self.rank_layout.rank == 0:  # every rank evicts alike; one line is enough
                log.debug("evicting adapter %r from slot %d for %r", old, slot, staged.name)
            del self._slot_by_name[old]
        for idx, buf in self._moe.items():
            write_moe_slot(buf, slot, staged.moe.get(idx), cfg.outer_shared_only)
        for path, buf in self._dense.items():
            write_dense_slot(buf, slot, staged.dense.get(path))
        self._slot_rank_S[slot] = staged.max_rank
        self._slot_paths[slot] = frozenset(staged.dense)
        self._names[slot] = staged.name
        self._slot_by_name[staged.name] = slot
        self._touch(slot)
        return slot

    def check(self, adapter: CanonicalAdapter) -> None:
        """Everything :meth:`load` checks, writing nothing (PoolError on a mismatch)."""
        cfg = self.config
        stage_adapter(adapter, self.rank_layout, cfg.max_rank, cfg.outer_shared_only,
                      self.moe_specs, self._shards, self.dense_specs, cfg.dtype)

    def unload(self, name: str) -> None:
        """Free the slot of ``name`` and zero it. Refuses a slot pinned by the running batch."""
        slot = self._slot_by_name.get(name)
        if slot is None:
            raise PoolError(f"adapter {name!r} is not loaded; loaded: {sorted(self._slot_by_name)}")
        if slot in self._pinned:
            raise PoolError(f"adapter {name!r} (slot {slot}) is in use by the running batch; "
                            f"call release_batch() before unloading it")
        for buf in self._moe.values():
            clear_moe_slot(buf, slot, self.config.outer_shared_only)
        for buf in self._dense.values():
            clear_dense_slot(buf, slot)
        self._slot_rank_S[slot] = 0
        self._slot_paths[slot] = frozenset()
        self._names[slot] = None
        del self._slot_by_name[name]
        self._last_use[slot] = 0

    # -- batches -----------------------------------------------------------------------------

    def prepare_batch(self, adapters_per_request: list[str | None],
                      registry: dict[str, CanonicalAdapter]) -> torch.Tensor:
        """Make every adapter of a batch resident and pin its slot.

        Args:
            adapters_per_request: adapter name of each of the B requests, None = base model.
            registry: name -> full canonical adapter, for the ones not loaded yet.
        Returns:
            ``req_to_slot_B``: ``[B]`` int32 on the pool's device, ``-1`` for None.
        Raises:
            PoolError: unknown name, more distinct adapters than slots, or a failed load (the
            pins this call added are then dropped; adapters it loaded stay loaded).
        """
        names = list(dict.fromkeys(n for n in adapters_per_request if n is not None))
        unknown = [n for n in names if n not in self._slot_by_name and n not in registry]
        if unknown:
            raise PoolError(f"batch asks for adapters {unknown} that are neither loaded nor in "
                            f"the registry ({sorted(registry)})")
        if len(names) > self.config.max_loras:
            raise PoolError(f"batch uses {len(names)} distinct adapters but the pool has "
                            f"max_loras={self.config.max_loras} slots; split the batch")
        for n in names:
            if n not in self._slot_by_name and registry[n].name != n:
                raise PoolError(f"registry key {n!r} holds an adapter named "
                                f"{registry[n].name!r}; the names must match")
        pinned_before = set(self._pinned)
        try:
            for n in names:  # pin resident ones first so loading the others cannot evict them
                if n in self._slot_by_name:
                    slot = self._slot_by_name[n]
                    self._pinned.add(slot)
                    self._touch(slot)
            for n in names:
                if n not in self._slot_by_name:
                    self._pinned.add(self.load(registry[n]))
        except Exception:
            self._pinned = pinned_before
            raise
        # Without waiting for the step in flight (the engine prepares step N+1 meanwhile).
        return to_device(torch.tensor([-1 if n is None else self._slot_by_name[n]
                                       for n in adapters_per_request], dtype=torch.int32),
                         self.config.device)

    def release_batch(self) -> None:
        """Unpin every slot pinned by ``prepare_batch``."""
        self._pinned.clear()

    # -- buffers -----------------------------------------------------------------------------

    def moe_buffers(self, layer: int) -> MoELoRAWeights:
        """Rank-local buffers of MoE layer ``layer`` (shapes in :mod:`..buffers`): what the
        reference and the kernels read, with this pool's dtype and device."""
        if layer not in self._moe:
            raise PoolError(f"the pool has no MoE layer {layer}; MoE layers: {sorted(self._moe)}")
        return self._moe[layer]

    def moe_shard(self, layer: int) -> MoEShard:
        """This rank's experts and rows of I in MoE layer ``layer`` (what the buffers hold)."""
        if layer not in self._shards:
            raise PoolError(f"the pool has no MoE layer {layer}; MoE layers: {sorted(self._moe)}")
        return self._shards[layer]

    def dense_buffers(self, path: str) -> DenseLoRABuffers:
        """Rank-local buffers of one dense module: ``a [S, R, in_local]``, ``b [S, out_local,
        R]`` (scaling folded in), ``slot_rank [S]`` int32."""
        if path not in self._dense:
            raise PoolError(f"the pool has no dense module {path!r}; known: {sorted(self._dense)}")
        return self._dense[path]

    def targets(self, path: str) -> bool:
        """Whether a resident adapter has a LoRA on dense module ``path`` (host-side, no sync):
        a model may leave out the LoRA of an optional module (the router) when none has."""
        return any(path in paths for paths in self._slot_paths)

    def targets_any(self, paths) -> bool:
        """Whether a resident adapter has a LoRA on any of the dense modules ``paths``."""
        wanted = frozenset(paths)
        return any(not wanted.isdisjoint(slot) for slot in self._slot_paths)

    @property
    def slot_rank_S(self) -> torch.Tensor:
        """``[S]`` int32 on device: max rank of each slot's adapter over all layers, 0 = empty."""
        return self._slot_rank_S

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"moe.{i}.{k}": t for i, b in self._moe.items() for k, t in b._asdict().items()}
        out.update({f"dense.{p}.{k}": t for p, b in self._dense.items()
                    for k, t in b.tensors().items()})
        out["slot_rank"] = self._slot_rank_S
        return out

    def nbytes(self) -> int:
        """Bytes of every buffer the pool holds on its device."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors().values())

    def describe(self) -> str:
        """A memory table a person can read: each buffer's shape and size, totals, slots."""
        return describe_pool(self, self._all_tensors())
