"""Dispatchers: move tokens to the ranks that own their experts and bring the results back.

Legend: T tokens, H hidden, K top-k, N tokens after dispatch on this rank, E_l local experts.

The layer code is the same for all of them (DESIGN section 3)::

    d = dispatcher.dispatch(x_TH, topk_weights_TK, topk_ids_TK, token_slot_T)
    y_NH = local_experts(d.x_NH, d.topk_weights_NK, d.topk_ids_NK, d.token_slot_N)
    y_TH = dispatcher.combine(y_NH, d)

``topk_ids_TK`` holds *global* expert ids on the way in; ``d.topk_ids_NK`` holds *local* ids,
``-1`` where the expert lives on another rank. Every rank of a TP group holds all ``T`` tokens
before and the full combined ``y_TH`` after.

- ``all_reduce`` (:class:`AllReduceDispatcher`): no token movement, static shapes, CUDA-graph
  safe; combine is one all-reduce over the TP group. Best for decode (small ``T``).
- ``all_to_all`` (:class:`~moelora_dist.moe.dispatch_a2a.AllToAllDispatcher`): tokens are split
  over the EP group and sent with ``all_to_all_single`` (prefill, large ``T``).
- ``all_to_all_static`` (:mod:`~moelora_dist.moe.dispatch_static`): the same shares, sent
  with even splits of fixed capacity (padding rows route nowhere): no split exchange, no host
  sync, CUDA-graph safe.
- ``ref_all_reduce`` / ``ref_all_to_all`` (:mod:`moelora_dist.moe.dispatch_ref`): plain
  ``all_gather`` references of the two, to test the fast paths against.
- ``auto`` (the default): ``all_reduce`` when ``ep <= AUTO_ALL_REDUCE_MAX_EP`` (2) or
  ``T < AUTO_ALL_TO_ALL_MIN_TOKENS`` (512), else ``all_to_all``. Measured on two H200s
  (``benchmarks/results/dist_layer_prefill.csv``): at EP = 2 the all-reduce path was the
  fastest at every T up to 16384 (1.27x one GPU eager at 16384, vs 0.96x all-to-all), because
  the all-to-all's fixed cost (split exchange, host sync, ~40 launches, ~1 ms) outweighs what
  it saves when half the tokens stay local anyway. Wider EP is unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from moelora_dist.moe.reference import localize_topk_ids
from moelora_dist.parallel.groups import ParallelGroups, group_size
from moelora_dist.parallel.layout import MoEShard

AUTO_ALL_TO_ALL_MIN_TOKENS = 512
AUTO_ALL_REDUCE_MAX_EP = 2
DISPATCHERS = ("auto", "all_reduce", "all_to_all", "all_to_all_static", "ref_all_reduce",
               "ref_all_to_all")

# (x_NH, topk_weights_NK fp32, local topk_ids_NK int32, token_slot_N int32 or None) -> y_NH
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Dispatched:
    """What a rank computes after dispatch. ``handle`` is the dispatcher's private state."""

    x_NH: torch.Tensor
    topk_weights_NK: torch.Tensor
    topk_ids_NK: torch.Tensor
    token_slot_N: torch.Tensor | None
    handle: object = None


class Dispatcher:
    """Base class: ``__call__`` runs dispatch -> ``expert_fn`` -> combine."""

    name = "base"

    def __init__(self, groups: ParallelGroups, shard: MoEShard):
        self.groups = groups
        self.shard = shard

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Dispatched:
        raise NotImplementedError

    def combine(self, y_NH: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                 topk_ids_TK: torch.Tensor, token_slot_T: torch.Tensor | None,
                 expert_fn: ExpertFn) -> torch.Tensor:
        """Args: ``x_TH [T, H]``, ``topk_weights_TK [T, K]`` fp32, ``topk_ids_TK [T, K]``
        int32 global ids, ``token_slot_T [T]`` int32 or None. Returns ``[T, H]`` in x's dtype,
        the full layer output, on every rank of the TP group."""
        d = self.dispatch(x_TH, topk_weights_TK, topk_ids_TK, token_slot_T)
        y_NH = expert_fn(d.x_NH, d.topk_weights_NK, d.topk_ids_NK, d.token_slot_N)
        return self.combine(y_NH, d)


class AllReduceDispatcher(Dispatcher):
    """No token movement: non-local experts become ``-1``; combine all-reduces over TP.

    Every shape is fixed by ``T``, and no value is read back to the host, so it can be
    captured in a CUDA graph.
    """

    name = "all_reduce"

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, token_slot_T) -> Dispatched:
        local_TK = localize_topk_ids(topk_ids_TK, self.shard.expert_start,
                                     self.shard.num_local_experts)
        return Dispatched(x_TH, topk_weights_TK, local_TK, token_slot_T)

    def combine(self, y_NH: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        # Each TP rank holds a partial sum: its experts (EP) and its I slice (MoE-TP).
        if group_size(self.groups.tp_group) > 1:
            dist.all_reduce(y_NH, group=self.groups.tp_group)
        return y_NH


def make_dispatcher(name: str, groups: ParallelGroups, shard: MoEShard) -> Dispatcher:
    """Build a dispatcher by name (one of :data:`DISPATCHERS` except ``auto``)."""
    if name == "all_reduce":
        return AllReduceDispatcher(groups, shard)
    if name == "all_to_all":
        from moelora_dist.moe.dispatch_a2a import AllToAllDispatcher

        return AllToAllDispatcher(groups, shard)
    if name == "all_to_all_static":
        from moelora_dist.moe.dispatch_static import AllToAllStaticDispatcher

        return AllToAllStaticDispatcher(groups, shard)
    if name in ("ref_all_reduce", "ref_all_to_all"):
        from moelora_dist.moe.dispatch_ref import ReferenceAllReduce, ReferenceAllToAll

        cls = ReferenceAllReduce if name == "ref_all_reduce" else ReferenceAllToAll
        return cls(groups, shard)
    raise ValueError(f"unknown dispatcher {name!r}; pick one of {DISPATCHERS}")


def auto_dispatcher_name(num_tokens: int, ep: int) -> str:
    """The dispatcher ``auto`` picks for ``num_tokens`` tokens and EP degree ``ep``."""
    if ep <= AUTO_ALL_REDUCE_MAX_EP or num_tokens < AUTO_ALL_TO_ALL_MIN_TOKENS:
        return "all_reduce"
    return "all_to_all"
