"""The dispatcher protocol: move tokens to the ranks that own their experts, bring results back.

Legend: T tokens, H hidden, K top-k, N rows this rank computes after dispatch.

Every dispatcher is used the same way by the layer (``moe/layer.py``), top to bottom::

    routed = dispatcher.dispatch(x_TH, topk_weights_TK, topk_ids_TK, token_slot_T)
    y_NH = experts(routed.x_NH, routed.topk_weights_NK, routed.topk_ids_NK, routed.token_slot_N)
    y_TH = dispatcher.combine(y_NH, routed)

``topk_ids_TK`` holds *global* expert ids on the way in; ``routed.topk_ids_NK`` holds *local*
ids, ``-1`` where the expert lives on another rank (or for padding rows). Every rank of a TP
group holds all ``T`` tokens before and the full combined ``y_TH`` after. ``dispatch`` hands
the experts contiguous weights, ids and slots; ``x_NH`` has contiguous rows but may have a row
stride larger than ``H`` (``all_to_all_fixed`` hands a view of its receive buffer, read in
place), so expert code reads it through its strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import MoEShard


@dataclass
class Routed:
    """What this rank computes after dispatch, and the dispatcher's state for combine.

    ``x_NH`` ``[N, H]`` (``stride(1) == 1``), ``topk_weights_NK`` fp32 ``[N, K]``, ``topk_ids_NK`` int32 local ids
    ``[N, K]`` (``-1``: skip), ``token_slot_N`` int32 ``[N]`` or None (no adapter in the
    batch); ``state``: private to the dispatcher that made it.
    """

    x_NH: torch.Tensor
    topk_weights_NK: torch.Tensor
    topk_ids_NK: torch.Tensor
    token_slot_N: torch.Tensor | None
    state: object = None


class Dispatcher:
    """Base class; see the module docstring for the protocol."""

    name = "base"

    def __init__(self, groups: ParallelGroups, shard: MoEShard):
        self.groups = groups
        self.shard = shard

    def dispatch(self, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                 topk_ids_TK: torch.Tensor, token_slot_T: torch.Tensor | None) -> Routed:
        """``x_TH [T, H]``, ``topk_weights_TK [T, K]`` fp32, ``topk_ids_TK [T, K]`` int32
        global ids, ``token_slot_T [T]`` int32 or None."""
        raise NotImplementedError

    def combine(self, y_NH: torch.Tensor, routed: Routed) -> torch.Tensor:
        """``y_NH [N, H]`` partial outputs of the routed rows -> ``[T, H]`` (x's dtype), the
        full layer output, on every rank of the TP group."""
        raise NotImplementedError
