"""Dispatchers of the MoE layer, by name (the protocol is in :mod:`.base`).

- ``all_reduce`` (:mod:`.all_reduce`): no token movement, static shapes, CUDA-graph safe;
  combine is one all-reduce over the TP group. Best for decode (small ``T``).
- ``all_to_all`` (:mod:`.all_to_all`): tokens are split over the EP group and sent with
  ``all_to_all_single`` (prefill, large ``T``).
- ``all_to_all_static`` (:mod:`.all_to_all_static`): the same shares, sent with even splits of
  fixed capacity (padding rows route nowhere): no split exchange, no host sync, graph safe.
- ``all_to_all_fixed`` (:mod:`.all_to_all_fixed`): the same shares, only the tokens each
  destination needs, up to a fixed capacity per destination (:mod:`.capacity`), packed and
  unpacked in place by the ``kernels/dispatch`` family; no split exchange, graph safe; an exact
  second exchange (counted in ``stats``, logged) when a destination needs more rows.
- ``ref_all_reduce`` / ``ref_all_to_all`` (:mod:`.reference`): plain ``all_gather``
  references of the two, to test the fast paths against.
- ``auto`` (the default): ``all_reduce`` when ``ep <= AUTO_ALL_REDUCE_MAX_EP`` (2) or
  ``T < AUTO_ALL_TO_ALL_MIN_TOKENS`` (512), else ``all_to_all``. Measured on two H200s
  (``benchmarks/results/current/dist_layer_prefill.csv``): at EP = 2 the all-reduce path was
  the fastest at every T up to 16384 (1.27x one GPU eager at 16384, vs 0.96x all-to-all),
  because the all-to-all's fixed cost (split exchange, host sync, ~40 launches, ~1 ms)
  outweighs what it saves when half the tokens stay local anyway. Wider EP is unmeasured.
  ``all_to_all_fixed`` is not in ``auto`` yet: it was built on CPU-only machines, and its GPU
  numbers (``python -m benchmarks dispatch``) decide whether it replaces ``all_to_all``.
"""

from __future__ import annotations

from moelora_dist.moe.dispatch.all_reduce import AllReduceDispatcher
from moelora_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moelora_dist.moe.dispatch.all_to_all_fixed import AllToAllFixedDispatcher
from moelora_dist.moe.dispatch.all_to_all_static import AllToAllStaticDispatcher
from moelora_dist.moe.dispatch.base import Dispatcher, Routed
from moelora_dist.moe.dispatch.reference import ReferenceAllReduce, ReferenceAllToAll

AUTO_ALL_TO_ALL_MIN_TOKENS = 512
AUTO_ALL_REDUCE_MAX_EP = 2
REGISTRY: dict[str, type[Dispatcher]] = {
    cls.name: cls for cls in (AllReduceDispatcher, AllToAllDispatcher, AllToAllStaticDispatcher,
                              AllToAllFixedDispatcher, ReferenceAllReduce, ReferenceAllToAll)}
DISPATCHERS = ("auto", *REGISTRY)

__all__ = ["AUTO_ALL_REDUCE_MAX_EP", "AUTO_ALL_TO_ALL_MIN_TOKENS", "DISPATCHERS", "REGISTRY",
           "Dispatcher", "Routed", "auto_dispatcher_name", "make_dispatcher"]


def make_dispatcher(name: str, groups, shard) -> Dispatcher:
    """Build a dispatcher by name (one of :data:`DISPATCHERS` except ``auto``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dispatcher {name!r}; pick one of {sorted(REGISTRY)}")
    return REGISTRY[name](groups, shard)


def auto_dispatcher_name(num_tokens: int, ep: int) -> str:
    """The dispatcher ``auto`` picks for ``num_tokens`` tokens and EP degree ``ep``."""
    if ep <= AUTO_ALL_REDUCE_MAX_EP or num_tokens < AUTO_ALL_TO_ALL_MIN_TOKENS:
        return "all_reduce"
    return "all_to_all"
