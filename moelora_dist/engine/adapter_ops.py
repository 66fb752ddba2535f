"""The engine's adapters: registered (full weights on the host), resident (pool slots), being
removed; and how the leader's decisions reach the other ranks of its TP group.

Only the leader decides: which adapters are registered, which slot each resident one takes
(LRU among slots no running sequence uses, :meth:`LoRAPool.prepare_batch`), when one leaves.
Each decision is an operation (``add``, ``load`` into an explicit slot, ``remove``) that rides
on the next step plan as JSON (:mod:`.plan`); a follower applies them in order before it runs
the forward, so its pool holds the same adapters in the same slots. An ``add`` carries the
adapter directory (the follower reads its own copy) or, for an adapter given in memory, a
description whose tensors follow as one fp32 broadcast (bf16/fp16 survive the round trip).

Removal while requests run: :meth:`AdapterManager.remove` refuses new requests for the adapter
at once and unloads it when no waiting or running sequence uses it any more.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from moelora_dist.adapters import CanonicalAdapter, LoRAFactors, MoELayerLoRA, load_adapter
from moelora_dist.errors import OptionError

log = logging.getLogger(__name__)


class AdapterManager:
    """Registry + pool slots of one rank (see the module docstring).

    Args:
        pool: the model's :class:`~moelora_dist.lora.pool.LoRAPool`.
        model_config: the model's raw ``config.json`` dict (checked by the loader).
    """

    def __init__(self, pool, model_config: dict):
        self.pool, self.model_config = pool, model_config
        self.registry: dict[str, CanonicalAdapter] = {}
        self.removing: set[str] = set()
        self._ops: list[dict] = []
        self._outgoing: dict[str, CanonicalAdapter] = {}
        # A follower's own view of the names its caller added / removed (SPMD code calls the
        # API on every rank): its requests are checked against the same names as the
        # leader's, while the weights arrive with the leader's plans.
        self.announced: set[str] = set()
        self.withdrawn: set[str] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self.registry)

    def servable(self, name: str | None) -> bool:
        if name is None:
            return True
        if name in self.withdrawn:
            return False
        return (name in self.registry and name not in self.removing) or name in self.announced

    def announce(self, name: str) -> None:
        """A follower's caller added ``name`` (the leader's plan brings the weights)."""
        self.announced.add(name)
        self.withdrawn.discard(name)

    def withdraw(self, name: str) -> None:
        """A follower's caller removed ``name``."""
        self.announced.discard(name)
        self.withdrawn.add(name)

    def add(self, name: str, adapter, **load_kwargs) -> CanonicalAdapter:
        """Register ``adapter`` (a PEFT directory or a :class:`CanonicalAdapter`) as
        ``name``, checked against the model and the pool now; loaded into a free slot if any."""
        if not isinstance(name, str) or not name:
            raise OptionError(f"adapter name {name!r}: give a non-empty string")
        if name in self.removing:
            raise OptionError(f"adapter {name!r} is being removed (requests still use it); "
                              "add it again once they finished")
        if name in self.registry:
            raise OptionError(f"an adapter named {name!r} is already registered; remove it "
                              "first")
        pool = self.pool
        path = None
        if not isinstance(adapter, CanonicalAdapter):
            path = str(adapter)
            adapter = load_adapter(path, model_config=self.model_config,
                                   max_rank=pool.config.max_rank, name=name, **load_kwargs)
        elif adapter.name != name:
            raise OptionError(f"adapter object is named {adapter.name!r}, registered as "
                              f"{name!r}; load it with name=... matching")
        unserved = sorted(set(adapter.dense) - set(pool.dense_specs))
        if unserved:
            raise OptionError(
                f"adapter {name!r} targets modules this engine does not serve: {unserved[:4]}; "
                "LoRA is served on q/k/v/o_proj, dense MLP gate/up/down_proj and the experts")
        pool.check(adapter)  # every shape, value and dtype against every layer, now
        self.registry[name] = adapter
        self._ops.append({"op": "add", "name": name, "path": path, "kwargs": load_kwargs,
                          "spec": None if path else describe(adapter)})
        if path is None:
            self._outgoing[name] = adapter
        if len(pool.loaded()) < pool.config.max_loras:
            self._ops.append({"op": "load", "name": name, "slot": pool.load(adapter)})
        return adapter

    def remove(self, name: str, in_use: bool) -> None:
        """Forget ``name``: now, or (``in_use``) once no sequence uses it (:meth:`settle`)."""
        if name not in self.registry or name in self.removing:
            raise OptionError(f"adapter {name!r} is not registered; registered: "
                              f"{sorted(set(self.registry) - self.removing)}")
        if in_use:
            self.removing.add(name)
        else:
            self._drop(name)

    def _drop(self, name: str) -> None:
        if self.pool.slot_of(name) is not None:
            self.pool.release_batch()  # not in use by anything that runs (caller's check)
            self.pool.unload(name)
        del self.registry[name]
        self.removing.discard(name)
        self._outgoing.pop(name, None)
        self._ops.append({"op": "remove", "name": name})

    def settle(self, in_use: set[str]) -> None:
        """Drop the adapters being removed that no sequence uses any more."""
        for name in sorted(self.removing - in_use):
            self._drop(name)

    def prepare(self, running: set[str]) -> dict[str, int]:
        """Pin the slots of every adapter the running sequences use, loading the missing ones
        (LRU, never evicting a pinned one); returns name -> slot of every resident adapter."""
        pool = self.pool
        pool.release_batch()
        before = pool.loaded()
        pool.prepare_batch(sorted(running), self.registry)
        after = pool.loaded()
        for name, slot in sorted(after.items(), key=lambda kv: kv[1]):
            if before.get(name) != slot:
                self._ops.append({"op": "load", "name": name, "slot": slot})
        return after

    def take_ops(self) -> tuple[list[dict], dict[str, CanonicalAdapter]]:
        """The operations since the last call, and the in-memory adapters they add."""
        ops, out = self._ops, self._outgoing
        self._ops, self._outgoing = [], {}
        return ops, {n: a for n, a in out.items() if any(
            o["op"] == "add" and o["name"] == n for o in ops)}

    def apply(self, ops: list[dict], group, src: int, device) -> None:
        """A follower: apply the leader's operations in order (tensors of in-memory adapters
        are received here, in the order of their ``add``)."""
        pool = self.pool
        for op in ops:
            name = op["name"]
            if op["op"] == "add":
                if op["path"] is not None:
                    adapter = load_adapter(op["path"], model_config=self.model_config,
                                           max_rank=pool.config.max_rank, name=name,
                                           **op["kwargs"])
                else:
                    adapter = receive(op["spec"], group, src, device)
                self.registry[name] = adapter
            elif op["op"] == "load":
                pool.release_batch()
                pool.load(self.registry[name], slot=op["slot"])
            elif op["op"] == "remove":
                if pool.slot_of(name) is not None:
                    pool.release_batch()
                    pool.unload(name)
                self.registry.pop(name, None)
            else:
                raise AssertionError(f"unknown adapter operation {op!r}")


def _factors(adapter: CanonicalAdapter):
    """Every factor tensor in a fixed order, with the shared gate/up ``A`` once."""
    for layer, moe in sorted(adapter.moe.items()):
        for proj, f in moe.projections().items():
            if not (proj == "up" and moe.gate_up_shared_a):
                yield f.a
            yield f.b
    for _, f in sorted(adapter.dense.items()):
        yield f.a
        yield f.b


def _fspec(f: LoRAFactors) -> dict:
    return {"a": list(f.a.shape), "b": list(f.b.shape), "scaling": f.scaling,
            "dtype": str(f.a.dtype).removeprefix("torch.")}


def describe(adapter: CanonicalAdapter) -> dict:
    """JSON-able structure of an adapter (shapes, scalings, dtypes), no values."""
    moe = {str(layer): {"num_experts": m.num_experts, "shared_a": m.gate_up_shared_a,
                        **{p: _fspec(f) for p, f in m.projections().items()}}
           for layer, m in sorted(adapter.moe.items())}
    return {"name": adapter.name, "format": adapter.format, "moe": moe,
            "dense": {p: _fspec(f) for p, f in sorted(adapter.dense.items())}}


def send(adapter: CanonicalAdapter, group, src: int, device) -> None:
    """Broadcast the values of an in-memory adapter (after its ``add`` operation)."""
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in _factors(adapter)])
    dist.broadcast(flat.to(device), src=src, group=group)


def receive(spec: dict, group, src: int, device) -> CanonicalAdapter:
    """Rebuild an in-memory adapter described by ``spec`` from the leader's broadcast."""
    def numel(shape):
        n = 1
        for s in shape:
            n *= s
        return n

    shapes = []
    for _, m in sorted(spec["moe"].items(), key=lambda kv: int(kv[0])):
        for proj in ("gate", "up", "down"):
            if proj in m:
                if not (proj == "up" and m["shared_a"]):
                    shapes.append(m[proj]["a"])
                shapes.append(m[proj]["b"])
    for _, f in sorted(spec["dense"].items()):
        shapes += [f["a"], f["b"]]
    flat = torch.empty(sum(numel(s) for s in shapes), dtype=torch.float32, device=device)
    dist.broadcast(flat, src=src, group=group)
    parts = iter(t.reshape(s) for t, s in zip(flat.cpu().split([numel(s) for s in shapes]),
                                              shapes))

    def factors(fs, a=None):
        dtype = getattr(torch, fs["dtype"])
        a = next(parts).to(dtype) if a is None else a
        return LoRAFactors(a, next(parts).to(dtype), fs["scaling"])

    moe = {}
    for layer, m in sorted(spec["moe"].items(), key=lambda kv: int(kv[0])):
        got = {}
        for proj in ("gate", "up", "down"):
            if proj in m:
                shared = got["gate"].a if proj == "up" and m["shared_a"] else None
                got[proj] = factors(m[proj], shared)
        moe[int(layer)] = MoELayerLoRA(m["num_experts"], **got)
    dense = {p: factors(f) for p, f in sorted(spec["dense"].items())}
    # The values are checked again here (the pool's load needs their statistics), so every
    # rank reaches the verdict on the same full tensors.
    return CanonicalAdapter(spec["name"], moe=moe, dense=dense, format=spec["format"],
                            source="broadcast")
