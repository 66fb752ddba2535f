"""Rank layout: which global rank plays which role, with no process group needed.

Global ranks are laid out as ``(dp, tp)`` with TP innermost, and each TP group is split as
``(ep, moe_tp)`` with MoE-TP innermost (docs/design.md section 2)::

    rank        = dp_rank * tp + tp_rank
    moe_ep_rank = tp_rank // moe_tp
    moe_tp_rank = tp_rank %  moe_tp

So MoE-TP groups are contiguous runs of ``moe_tp`` ranks and EP groups are strided by
``moe_tp``. Everything here is plain integer arithmetic: loaders, slicers and pools are unit
tested for any layout on one CPU process by building a :class:`RankLayout` for a mocked rank.
Slice MoE weights with :meth:`RankLayout.moe_shard` only; never from ``tp_rank`` at a call site.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from moelora_dist.errors import MoeloraError


class LayoutError(MoeloraError):
    """A parallel layout or model shape that cannot be built; the message names the fix."""


@dataclass(frozen=True)
class RankCoords:
    """Coordinates of one global rank in a :class:`Layout`."""

    rank: int
    dp_rank: int
    tp_rank: int
    moe_ep_rank: int
    moe_tp_rank: int


@dataclass(frozen=True)
class MoEShard:
    """The part of one MoE layer that a rank owns.

    Experts ``[expert_start, expert_start + num_local_experts)`` (contiguous, ``E / ep`` each)
    and intermediate rows ``[i_start, i_start + i_local)`` (``I / moe_tp`` each).
    """

    num_experts: int
    intermediate: int
    expert_start: int
    num_local_experts: int
    i_start: int
    i_local: int

    @property
    def expert_end(self) -> int:
        return self.expert_start + self.num_local_experts

    @property
    def i_end(self) -> int:
        return self.i_start + self.i_local

    def owns_expert(self, expert: int) -> bool:
        return self.expert_start <= expert < self.expert_end

    @property
    def expert_slice(self) -> slice:
        """This rank's experts, as an index into a full ``[E, ...]`` tensor."""
        return slice(self.expert_start, self.expert_end)

    @property
    def i_slice(self) -> slice:
        """This rank's rows (columns) of ``I``, as an index into a full ``I`` dim."""
        return slice(self.i_start, self.i_end)

    @property
    def gate_up_slices(self) -> tuple[slice, slice]:
        """This rank's gate rows and up rows inside a fused ``2I`` dim (gate rows first):
        the same ``I`` range cut from each half, so a rank gets matching gate and up rows."""
        I = self.intermediate
        return slice(self.i_start, self.i_end), slice(I + self.i_start, I + self.i_end)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism, validated on construction.

    ``world_size = dp * tp`` and ``tp = ep * moe_tp``. Raises :class:`LayoutError` before
    anything is built when the numbers do not fit.
    """

    world_size: int
    tp: int
    ep: int = 1

    def __post_init__(self) -> None:
        _check_positive(world_size=self.world_size, tp=self.tp, ep=self.ep)
        if self.world_size % self.tp:
            raise LayoutError(
                f"tp={self.tp} does not divide world_size={self.world_size}; pick tp from "
                f"{divisors(self.world_size)} or launch a multiple of {self.tp} processes"
            )
        if self.tp % self.ep:
            raise LayoutError(
                f"ep={self.ep} does not divide tp={self.tp} (the EP group lives inside the TP "
                f"group, moe_tp = tp / ep); pick ep from {divisors(self.tp)}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside world_size={self.world_size}")
        dp_rank, tp_rank = divmod(rank, self.tp)
        moe_ep_rank, moe_tp_rank = divmod(tp_rank, self.moe_tp)
        return RankCoords(rank, dp_rank, tp_rank, moe_ep_rank, moe_tp_rank)

    def rank_of(self, dp_rank: int, moe_ep_rank: int, moe_tp_rank: int) -> int:
        return dp_rank * self.tp + moe_ep_rank * self.moe_tp + moe_tp_rank

    @cached_property
    def tp_groups(self) -> list[list[int]]:
        """One list per DP replica: its TP ranks, contiguous."""
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]

    @cached_property
    def moe_tp_groups(self) -> list[list[int]]:
        """Contiguous runs of ``moe_tp`` ranks, one per (dp_rank, moe_ep_rank)."""
        return [
            [self.rank_of(d, e, m) for m in range(self.moe_tp)]
            for d in range(self.dp)
            for e in range(self.ep)
        ]

    @cached_property
    def ep_groups(self) -> list[list[int]]:
        """Ranks strided by ``moe_tp``, one group per (dp_rank, moe_tp_rank)."""
        return [
            [self.rank_of(d, e, m) for e in range(self.ep)]
            for d in range(self.dp)
            for m in range(self.moe_tp)
        ]

    def check_model(self, num_experts: int, intermediate: int) -> None:
        """Raise :class:`LayoutError` if a MoE layer of this shape cannot be split this way."""
        _check_positive(num_experts=num_experts, intermediate=intermediate)
        if num_experts % self.ep:
            raise LayoutError(
                f"num_experts={num_experts} is not divisible by ep={self.ep}; pick ep from "
                f"{[d for d in divisors(self.tp) if num_experts % d == 0]}"
            )
        if intermediate % self.moe_tp:
            raise LayoutError(
                f"intermediate={intermediate} is not divisible by moe_tp = tp / ep = "
                f"{self.tp}/{self.ep} = {self.moe_tp}; raise ep or lower tp so that moe_tp "
                f"divides {intermediate}"
            )

    def moe_shard(self, rank: int, num_experts: int, intermediate: int) -> MoEShard:
        self.check_model(num_experts, intermediate)
        c = self.coords(rank)
        e_local = num_experts // self.ep
        i_local = intermediate // self.moe_tp
        return MoEShard(
            num_experts=num_experts,
            intermediate=intermediate,
            expert_start=c.moe_ep_rank * e_local,
            num_local_experts=e_local,
            i_start=c.moe_tp_rank * i_local,
            i_local=i_local,
        )

    def rank(self, rank: int) -> "RankLayout":
        return RankLayout(self, rank)

    def __str__(self) -> str:
        return (
            f"world={self.world_size} dp={self.dp} tp={self.tp} ep={self.ep} "
            f"moe_tp={self.moe_tp}"
        )


@dataclass(frozen=True)
class RankLayout:
    """One rank's view of a :class:`Layout`. Built from a real process group or mocked."""

    layout: Layout
    rank: int

    def __post_init__(self) -> None:
        self.layout.coords(self.rank)  # validates the rank

    @property
    def coords(self) -> RankCoords:
        return self.layout.coords(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def moe_ep_rank(self) -> int:
        return self.coords.moe_ep_rank

    @property
    def moe_tp_rank(self) -> int:
        return self.coords.moe_tp_rank

    def moe_shard(self, num_experts: int, intermediate: int) -> MoEShard:
        return self.layout.moe_shard(self.rank, num_experts, intermediate)

    @classmethod
    def single(cls) -> "RankLayout":
        """The trivial layout of one process."""
        return cls(Layout(1, 1, 1), 0)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_layouts(world_size: int, num_experts: int | None = None,
                  intermediate: int | None = None) -> list[Layout]:
    """Every ``(tp, ep)`` layout of ``world_size`` ranks, optionally fitting a model shape."""
    out = []
    for tp in divisors(world_size):
        for ep in divisors(tp):
            layout = Layout(world_size, tp, ep)
            if num_experts is not None and num_experts % ep:
                continue
            if intermediate is not None and intermediate % layout.moe_tp:
                continue
            out.append(layout)
    return out
