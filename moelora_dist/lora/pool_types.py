"""Configuration, specs and dense buffers of the LoRA slot pool (see :mod:`.pool`).

Legend: S slots, R max rank. Dense buffers hold one module's rank-local LoRA:

    a: [S, R, in_local]    rows past the slot's rank are zero
    b: [S, out_local, R]   scaling folded in; columns past the slot's rank are zero

``in_local = in_dim / tp`` for a row-parallel module, ``out_local = out_dim / tp`` for a
column-parallel one, the full dims otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.errors import MoeloraError
from moelora_dist.lora.slicing import DENSE_SPLITS


class PoolError(MoeloraError):
    """The pool cannot do what was asked (bad adapter, all slots pinned, unknown name)."""


def _positive(owner: str, **values) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PoolError(f"{owner}.{k} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class MoELayerSpec:
    """Full (unsliced) shape of one MoE layer: ``E`` experts, hidden ``H``, intermediate ``I``."""

    num_experts: int
    hidden: int
    intermediate: int

    def __post_init__(self) -> None:
        _positive("MoELayerSpec", num_experts=self.num_experts, hidden=self.hidden,
                  intermediate=self.intermediate)


@dataclass(frozen=True)
class DenseModuleSpec:
    """Full dims of one dense module and how TP splits it: column | row | replicated."""

    in_dim: int
    out_dim: int
    split: str

    def __post_init__(self) -> None:
        _positive("DenseModuleSpec", in_dim=self.in_dim, out_dim=self.out_dim)
        if self.split not in DENSE_SPLITS:
            raise PoolError(f"DenseModuleSpec.split is {self.split!r}; use one of {DENSE_SPLITS}")

    def local_dims(self, tp: int) -> tuple[int, int]:
        """``(in_local, out_local)`` on one rank of a TP group of size ``tp``."""
        dim = {"row": self.in_dim, "column": self.out_dim}.get(self.split)
        if dim is not None and dim % tp:
            raise PoolError(
                f"a {self.split}-parallel module of dims in={self.in_dim} out={self.out_dim} "
                f"cannot be split over tp={tp}: {dim} is not divisible by {tp}"
            )
        in_local = self.in_dim // tp if self.split == "row" else self.in_dim
        out_local = self.out_dim // tp if self.split == "column" else self.out_dim
        return in_local, out_local


@dataclass
class PoolConfig:
    """``max_loras`` slots of rank ``max_rank``. ``outer_shared_only`` builds the outer MoE
    buffers (gate/up A, down B) with an expert dim of 1, which serves shared-outer adapters at
    ``1/E_l`` of their memory and refuses per-expert ones."""

    max_loras: int
    max_rank: int
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    outer_shared_only: bool = False

    def __post_init__(self) -> None:
        _positive("PoolConfig", max_loras=self.max_loras, max_rank=self.max_rank)
        if not self.dtype.is_floating_point:
            raise PoolError(f"PoolConfig.dtype must be a floating dtype, got {self.dtype}")


@dataclass
class DenseLoRABuffers:
    a: torch.Tensor  # [S, R, in_local]
    b: torch.Tensor  # [S, out_local, R] (scaling folded in)
    slot_rank: torch.Tensor  # [S] int32

    @classmethod
    def zeros(cls, num_slots: int, max_rank: int, in_local: int, out_local: int, *,
              dtype: torch.dtype, device: torch.device | str = "cpu") -> "DenseLoRABuffers":
        return cls(
            a=torch.zeros(num_slots, max_rank, in_local, dtype=dtype, device=device),
            b=torch.zeros(num_slots, out_local, max_rank, dtype=dtype, device=device),
            slot_rank=torch.zeros(num_slots, dtype=torch.int32, device=device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b, "slot_rank": self.slot_rank}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
